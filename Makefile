# Set-up and everyday commands. PYTHON=/path/to/python uses an existing environment instead of .venv
# (one where `import detectron2` already works is left as it is).
PYTHON ?= .venv/bin/python
DEMO_CONFIG := configs/shapes/mask_rcnn_R18_FPN_gn_scratch.yaml
export PYTHON

.PHONY: install demo test data

install:
	bash dev/install.sh

data: install
	$(PYTHON) datasets/prepare_shapes.py

demo: data
	$(PYTHON) tools/train_net.py --config-file $(DEMO_CONFIG) $(ARGS)

test: install
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)
