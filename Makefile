# Shortcuts; each target is one command from the README or docs/.
PY ?= python

.PHONY: install test demo bench bench-layer
install:
	pip install -e '.[test]'
test:
	$(PY) -m pytest -q
demo:
	bash launch/demo.sh
bench:
	$(PY) benchmarks/throughput.py
bench-layer:
	$(PY) benchmarks/lte_layer.py
