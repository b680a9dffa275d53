# The two commands of the README. Both build .venv with pip when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.medsaga-installed

.PHONY: demo test install clean sample-data

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch and torchvision first, pinned to the builds this machine's pip serves from its disk
	$(PY) -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install --quiet -e ".[test,int8]"
	touch $(STAMP)

# Debian's mricron-data ships the realistic benchmark tasks (Colin27 + AAL); tests that need it skip without it
install: $(STAMP) sample-data

sample-data:
	@if [ -d /usr/share/mricron/templates ]; then echo "mricron-data: installed"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get install -y mricron-data >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y mricron-data; } \
		|| echo "mricron-data could not be installed: the Colin27/AAL tasks and their tests are skipped"; \
	else echo "mricron-data not installed (needs apt-get as root): the Colin27/AAL tasks and their tests are skipped"; fi

demo: $(STAMP) sample-data
	$(PY) -m MedSAGaLib.demo --output demo-output

test: $(STAMP) sample-data
	$(PY) -m pytest -ra

clean:
	rm -rf demo-output .pytest_cache
