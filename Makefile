# NÜWA-mini: `make demo` and `make test` each bootstrap .venv on a fresh machine by themselves.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The offline MNIST copy beside the checkout, used when NUWA_DATA is not already set.
SHARED_MNIST := $(abspath ../shared/data/mnist)
ifeq ($(NUWA_DATA),)
ifneq ($(wildcard $(SHARED_MNIST)/train-images-idx3-ubyte.gz),)
export NUWA_DATA := $(SHARED_MNIST)
endif
endif

.PHONY: demo models tasks lip infinity test notebooks bench lint clean

# The stamp depends on pyproject.toml so a changed dependency list re-installs.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# An unpinned torch would pull gigabytes of CUDA packages: install the CPU build first
	# when no torch is present. pyproject only asks for torch>=2.6, which this satisfies.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

# The demo, on real Moving MNIST (about 14 minutes on 2 CPU cores):
#   1. render captioned clips;
#   2. train the tiny VQ-GAN tokenizer (3 min) and draw its reconstructions of held-out frames; the demo's
#      tokenizer reads each 8×8 pixel cell on its own (--cell-encoder, f = 8: 8×8 tokens per frame), so
#      every empty cell is one token and a 10-frame clip is 640 tokens: the tiny NÜWA then learns to draw
#      digits within minutes on a CPU (RESULTS.md);
#   3. train the tiny NÜWA (9 min): text→image alone for 500 steps (drawing a digit comes first), then
#      200 steps on clips' opening frames alone (which way the caption sends the digit), then
#      text→image, text→video and 16 opening-frame clips per step together, captions dropped to "None"
#      in 10 % of clips (the `make models` recipe, shorter). Without a GPU it runs as two processes
#      of half the cores each (DDP over gloo: each computes half of every step's clips and the
#      gradients are averaged, so the model is the one a single process would train, only more steps
#      of it fit in the budget): on 2 cores 1.35× the steps of one two-thread process (RESULTS.md,
#      "Carrying the digit on"), which is what lets the demo's digit move as captioned;
#   4. sample text→video (classifier-free guidance 1.5; a first frame that holds no ink is drawn again,
#      else the empty frame is copied to the end) and
#      10 → 10 prediction (the caption-free model continuing given frames) into out/demo/samples/
#      (PNG grids and GIFs).
DEMO := out/demo
DEMO_NUWA_SECONDS ?= 540
# Processes for NÜWA's training in make demo and make models: 1 with a GPU, else 2 (one per half of
# the cores). Expanded when the recipe runs, after .venv exists.
NUWA_PROCS ?= $(shell $(PY) -c "import torch; print(1 if torch.cuda.is_available() else 2)")
NUWA_THREADS ?= $(shell $(PY) -c "import os; print(max(1, (os.cpu_count() or 2) // 2))")
NUWA_TRAIN = $(if $(filter 1,$(NUWA_PROCS)),$(PY) train.py,OMP_NUM_THREADS=$(NUWA_THREADS) $(PY) -m torch.distributed.run \
	--standalone --nproc_per_node $(NUWA_PROCS) train.py --threads $(NUWA_THREADS))
demo: $(VENV)/.installed
	$(PY) data.py --out $(DEMO)
	$(PY) train.py --stage vqgan --preset tiny --cell-encoder --ch-mult 1 2 4 4 --max-seconds 180 --out $(DEMO)
	$(PY) evaluate.py recon --ckpt $(DEMO)/vqgan/ckpt.pt --num-sequences 100 --grid $(DEMO)/vqgan_reconstructions.png
	$(NUWA_TRAIN) --stage nuwa --preset tiny --tasks t2i,t2v,t2v_start --t2i-steps 500 --start-steps 200 \
		--start-batch-size 32 --mix-start-batch-size 16 --cond-drop-prob 0.1 --max-seconds $(DEMO_NUWA_SECONDS) --token-h 8 --token-w 8 --batch-size 4 --vqgan-ckpt $(DEMO)/vqgan/ckpt.pt \
		--seg-ckpt "" --out $(DEMO)
	$(PY) sample.py t2v --ckpt $(DEMO)/nuwa/ckpt.pt --caption "digit 3 is moving up then down" -n 3 \
		--top-k 16 --guidance 1.5 --redraw-empty --out $(DEMO)/samples
	$(PY) sample.py predict --ckpt $(DEMO)/nuwa/ckpt.pt -n 3 --top-k 16 --out $(DEMO)/samples
	@echo "demo done: see $(DEMO)/ (captioned clips, tokenizer reconstructions, nuwa/ training, samples/)"

# The long CPU recipe (about 60 minutes on 2 cores): the demo's tokenizer trained 10 minutes, NÜWA
# trained 45: first 600 steps on clips' opening frames alone (t2v_start: 32 clips of 2 frames under
# their whole caption, where the model learns which way the caption sends the digit first), then
# text→image, text→video and 16 opening-frame clips per step together, with the caption dropped to
# "None" in 10 % of clips (for classifier-free guidance, and so that "None" + given frames is video
# prediction); written where sample.py and the notebooks look by default (out/vqgan, out/nuwa), then
# samples in out/samples. Without a GPU NÜWA trains as two processes, as in make demo: 8,116 steps in
# the 45 minutes against 5,539 for one process (RESULTS.md). On seen captions (guidance
# 1.5) it draws the digit in 96–97 % of videos and moves it as captioned in 80–87 %; held-out (digit,
# motion) pairs get their digit (90–97 %) but their motion in only a quarter, with one process too.
# V2V training is left out: its 20-frame clips took two thirds of every step, and two-digit 10-frame
# V2V clips in the mix did not help prediction.
# MODELS_VQGAN_SECONDS / MODELS_NUWA_SECONDS shorten it.
MODELS := out
MODELS_VQGAN_SECONDS ?= 600
MODELS_NUWA_SECONDS ?= 2700
models: $(VENV)/.installed
	$(PY) data.py --out $(MODELS)
	$(PY) train.py --stage vqgan --preset tiny --cell-encoder --ch-mult 1 2 4 4 --max-seconds $(MODELS_VQGAN_SECONDS) \
		--out $(MODELS)
	$(NUWA_TRAIN) --stage nuwa --preset tiny --tasks t2i,t2v,t2v_start --start-steps 600 --start-batch-size 32 \
		--mix-start-batch-size 16 --cond-drop-prob 0.1 --max-seconds $(MODELS_NUWA_SECONDS) --token-h 8 --token-w 8 \
		--batch-size 4 --vqgan-ckpt $(MODELS)/vqgan/ckpt.pt --seg-ckpt "" --out $(MODELS)
	$(PY) sample.py t2v --ckpt $(MODELS)/nuwa/ckpt.pt --caption "digit 3 is moving up then down" -n 3 \
		--top-k 16 --guidance 1.5 --redraw-empty --out $(MODELS)/samples
	$(PY) sample.py predict --ckpt $(MODELS)/nuwa/ckpt.pt -n 3 --top-k 16 --out $(MODELS)/samples
	@echo "models done: $(MODELS)/vqgan, $(MODELS)/nuwa (sample.py and the notebooks read out/vqgan, out/nuwa by default), samples in $(MODELS)/samples"

# The eight tasks of notebook 03 (about 30 minutes on 2 cores, after `make models`): a sketch tokenizer
# (VQ-GAN-Seg with the same 8×8 px cells, 5 min) and a NÜWA trained 25 min on every conditioned task
# (text→image, text→video, its opening frames, sketch→image, sketch→video) on the frame tokenizer of
# `make models`, captions dropped to "None" in 10 % of clips (guidance, and "None" + given frames is
# video prediction); 32 opening-frame clips per step for 300 steps, then 16 per step in the mix (as in
# `make models`). Completion, manipulation and text-guided video editing are these models sampled
# with given tokens. Written to out/tasks, where notebook 03 looks first.
TASKS := out/tasks
TASKS_SEG_SECONDS ?= 300
TASKS_NUWA_SECONDS ?= 1500
tasks: $(VENV)/.installed
	@test -f $(MODELS)/vqgan/ckpt.pt || { echo "make tasks trains on the frame tokenizer of make models: run make models first"; exit 1; }
	$(PY) train.py --stage seg --preset tiny --cell-encoder --ch-mult 1 2 4 4 --max-seconds $(TASKS_SEG_SECONDS) \
		--out $(TASKS)
	$(PY) train.py --stage nuwa --preset tiny --tasks t2i,t2v,t2v_start,s2i,s2v --start-steps 300 \
		--start-batch-size 32 --mix-start-batch-size 16 --cond-drop-prob 0.1 --max-seconds $(TASKS_NUWA_SECONDS) \
		--token-h 8 --token-w 8 --batch-size 4 --vqgan-ckpt $(MODELS)/vqgan/ckpt.pt --seg-ckpt $(TASKS)/seg/ckpt.pt \
		--out $(TASKS)
	@echo "tasks done: $(TASKS) (notebook 03 reads out/tasks: its model of every task)"

# NÜWA-LIP on the models of `make models` (27 minutes on 2 cores, after `make models`): a DF-VQGAN
# that keeps that frame tokenizer's encoder and codes and learns only the symmetrical connection of its
# decoder (5 min), then MP-S2S (20 min) started from that NÜWA's caption → frame path (the decoder, code
# and caption embeddings; its visible-token and pixel encoders start fresh), captions dropped to "None"
# in 10 % of frames for classifier-free guidance. Written to out/dfvqgan and out/lip, where sample.py
# inpaint and notebook 05 look; then one inpainting (guidance 3) and the 200-frame benchmark (RESULTS.md,
# NÜWA-LIP: the caption's digit in 84–88 % of one-sample fills, the masked input alone 45 %; under a
# swapped caption both fills follow their caption in 51–60 % of pairs with one sample, 63–70 % when
# each is the best of 4 by NÜWA's caption score, a model apart from the digit judge).
LIP_DFVQGAN_SECONDS ?= 300
LIP_SECONDS ?= 1200
lip: $(VENV)/.installed
	@test -f $(MODELS)/nuwa/ckpt.pt || { echo "make lip starts from the tokenizer and NÜWA of make models: run make models first"; exit 1; }
	$(PY) train.py --stage dfvqgan --preset tiny --cell-encoder --ch-mult 1 2 4 4 --init-vqgan $(MODELS)/vqgan/ckpt.pt \
		--freeze-tokens --dead-code-threshold 0 --max-seconds $(LIP_DFVQGAN_SECONDS) --out $(MODELS)
	$(PY) train.py --stage lip --preset tiny --token-h 8 --token-w 8 --patch 8 --text-layers 0 --extent 2 2 2 \
		--relative-bias --relative-keys --init-nuwa $(MODELS)/nuwa/ckpt.pt --cond-drop-prob 0.1 \
		--dfvqgan-ckpt $(MODELS)/dfvqgan/ckpt.pt --max-seconds $(LIP_SECONDS) --out $(MODELS)
	$(PY) sample.py inpaint --ckpt $(MODELS)/lip/ckpt.pt --top-k 16 --guidance 3 --out $(MODELS)/samples
	$(PY) benchmarks/bench_lip.py --lip $(MODELS)/lip/ckpt.pt --baseline $(MODELS)/nuwa/ckpt.pt --n 200 --candidates 4 \
		--guidance 3 --png $(MODELS)/lip_bench/inpainting.png
	@echo "lip done: $(MODELS)/dfvqgan, $(MODELS)/lip (sample.py inpaint and notebook 05 read out/dfvqgan, out/lip), benchmark in $(MODELS)/lip_bench"

# NÜWA-Infinity on the frame tokenizer of `make models` (29 minutes on 2 cores, after `make
# models`): two models trained side by side for 25 minutes, one CPU thread each (their per-patch
# kernels are too small for two threads to help: a step takes twice as long on two; when one fails,
# the other is stopped), logs in out/infinity_*.log: a canvas model on 64×128 px canvases of MNIST
# digits (patches of 32×32 px, orders sampled among raster / column / left / up), and a video model
# on 4-frame one-digit Moving MNIST clips captioned with their digit's name (one patch per frame,
# two frames of context). Written to out/infinity and out/infinity_video; then the digit classifier
# if it is missing (`classifier.py`), strips 4× and 16× wider than training read slot by
# slot, and 100-frame videos read in their last 10 frames, plain and with classifier-free guidance 3
# on the caption naming the digit (RESULTS.md, NÜWA-Infinity). With `make lip`, under an hour for these stages.
INFINITY_SECONDS ?= 1500
INFINITY_VIDEO_SECONDS ?= 1500
infinity: $(VENV)/.installed
	@test -f $(MODELS)/vqgan/ckpt.pt || { echo "make infinity draws with the frame tokenizer of make models: run make models first"; exit 1; }
	@echo "training the canvas and the video model side by side (logs: $(MODELS)/infinity_canvas.log, $(MODELS)/infinity_video.log)"
	$(PY) train.py --stage infinity --preset tiny --vqgan-ckpt $(MODELS)/vqgan/ckpt.pt --threads 1 \
		--max-seconds $(INFINITY_SECONDS) --out $(MODELS) > $(MODELS)/infinity_canvas.log 2>&1 & canvas=$$!; \
	$(PY) train.py --stage infinity --preset tiny --vqgan-ckpt $(MODELS)/vqgan/ckpt.pt --threads 1 --data video \
		--directions video --extent 2 1 1 --patch-size 8 8 --video-captions --max-seconds $(INFINITY_VIDEO_SECONDS) \
		--out $(MODELS)/infinity_video > $(MODELS)/infinity_video.log 2>&1 & video=$$!; \
	wait -n; first=$$?; test $$first -eq 0 || kill $$canvas $$video 2>/dev/null; \
	wait $$canvas; a=$$?; wait $$video; b=$$?; tail -n 1 $(MODELS)/infinity_canvas.log $(MODELS)/infinity_video.log; \
	test $$first -eq 0 -a $$a -eq 0 -a $$b -eq 0
	test -f $(MODELS)/classifier/classifier.pt || $(PY) classifier.py --out $(MODELS)/classifier --max-seconds 300
	$(PY) evaluate.py infinity --classifier $(MODELS)/classifier --ckpt $(MODELS)/infinity/ckpt.pt --width 512 \
		--grid $(MODELS)/infinity_eval/strips_512.png
	$(PY) evaluate.py infinity --classifier $(MODELS)/classifier --ckpt $(MODELS)/infinity/ckpt.pt --width 2048 \
		--num-canvases 10 --grid $(MODELS)/infinity_eval/strips_2048.png
	$(PY) evaluate.py infinity --classifier $(MODELS)/classifier --ckpt $(MODELS)/infinity_video/infinity/ckpt.pt \
		--frames 100 --batch-size 10
	$(PY) evaluate.py infinity --classifier $(MODELS)/classifier --ckpt $(MODELS)/infinity_video/infinity/ckpt.pt \
		--frames 100 --batch-size 10 --guidance 3 --grid $(MODELS)/infinity_eval/video_100.png
	@echo "infinity done: $(MODELS)/infinity, $(MODELS)/infinity_video (sample.py infinity and notebook 06 read them under out/), readings in $(MODELS)/infinity_eval"

test: $(VENV)/.installed
	$(PY) -m pytest -q -m "not gpu" $(PYTEST_ARGS)

notebooks: $(VENV)/.installed
	$(PY) tests/run_notebooks.py --inplace

bench: $(VENV)/.installed
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b --quick || exit 1; done

lint: $(VENV)/.installed
	$(PY) -m ruff check .

clean:
	rm -rf out .pytest_cache
