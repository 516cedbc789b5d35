# make test  - create/refresh .venv, then lint (ruff check, ruff format --check) and run the test suite (what CI runs)
# make demo  - create/refresh .venv, then run the ShapesWorld demo and write runs/demo/report.html (FORCE=1 retrains the teacher)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEACHER := runs/demo/teacher/open_clip
DEMO_RECIPE ?= vl2v_adip+augment
DEMO_ADAPT ?= lora
SPLITS := runs/data/shapesworld

.PHONY: venv test demo clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

test: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

demo: venv
	@if [ -f $(TEACHER)/open_clip_config.json ] && [ -z "$(FORCE)" ]; then \
		echo "teacher cached in $(TEACHER); skipping pretraining (make demo FORCE=1 retrains it)"; \
	else \
		$(BIN)/distill fit --config configs/demo/base.yaml --config configs/demo/teacher.yaml; \
	fi
	$(BIN)/distill test --config configs/demo/base.yaml --config configs/demo/teacher_eval.yaml
	@test -f $(SPLITS)/split_zhou_ShapesWorld.json || $(BIN)/python -m distill.shapesworld_splits --root $(SPLITS)
	$(BIN)/python benchmarks/adapt_report.py --methods '[$(DEMO_ADAPT)]' --seeds '[1]' --shots '[]' --distil false \
		--out runs/demo/adapt
	$(BIN)/python benchmarks/distill_report.py --recipes '[$(DEMO_RECIPE)]' --seeds '[0]' --max_steps 300 \
		--extra_args '["--model.init_args.align_steps=150"]' --out runs/demo/report
	$(BIN)/python benchmarks/export_report.py --recipe $(DEMO_RECIPE) --runs runs/demo/report --out runs/demo/export
	$(BIN)/distill report runs/demo

clean:
	rm -rf runs lightning_logs
