# Two commands matter: `make run` (start the broker) and `make test` (the whole suite).
# Both create .venv, install what is missing, and install the project.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
SYSPKGS := bubblewrap libseccomp2 util-linux e2fsprogs haproxy
# The RunShellCommand toolbox (docs/shell.md): command:Debian package.
SHELL_TOOLS := awk:mawk which:debianutils file:file jq:jq sqlite3:sqlite3 zip:zip unzip:unzip \
	tar:tar gzip:gzip bzip2:bzip2 xz:xz-utils diff:diffutils iconv:libc-bin bc:bc \
	sed:sed grep:grep find:findutils xargs:findutils sort:coreutils
PYTEST_ARGS ?=
# The suite runs on pytest-xdist workers, one test file per worker at a time
# (module-scoped kernels and brokers stay shared): most tests wait on kernels
# rather than burn CPU (a serial run on 2 cores keeps under one core busy), so
# four workers even on two cores.  `make test PYTEST_XDIST=` runs it in one process.
PYTEST_XDIST ?= -n 4 --dist loadfile

.PHONY: run test install system-deps kernelspec bench bench-quick reliability clean

run: install
	$(BIN)/broker serve

test: install
	$(BIN)/python -m pytest $(PYTEST_XDIST) $(PYTEST_ARGS)

install: system-deps $(STAMP)

# The sandbox needs bubblewrap (Debian package `bubblewrap`), libseccomp and,
# as root, util-linux and e2fsprogs; the shell sandbox's toolbox needs the
# SHELL_TOOLS packages; the router tests (tests/test_router.py) need haproxy;
# the page's browser tests (tests/test_page.py) need Debian's chromium (driven
# by Playwright, which never downloads a browser). As root we install them;
# otherwise we say exactly what to run (chromium only gets a note: without it
# the browser tests skip and say why).
system-deps:
	@missing=""; \
	for pair in $(SHELL_TOOLS); do \
	  cmd=$${pair%%:*}; pkg=$${pair#*:}; \
	  command -v $$cmd >/dev/null 2>&1 || case " $$missing " in *" $$pkg "*) ;; *) missing="$$missing $$pkg";; esac; \
	done; \
	command -v bwrap >/dev/null 2>&1 || missing="$$missing bubblewrap"; \
	ldconfig -p 2>/dev/null | grep -q libseccomp.so.2 || [ -e /usr/lib/x86_64-linux-gnu/libseccomp.so.2 ] || [ -e /usr/lib/aarch64-linux-gnu/libseccomp.so.2 ] || missing="$$missing libseccomp2"; \
	command -v setpriv >/dev/null 2>&1 || missing="$$missing util-linux"; \
	command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || missing="$$missing haproxy"; \
	command -v mkfs.ext4 >/dev/null 2>&1 || [ -x /usr/sbin/mkfs.ext4 ] || [ -x /sbin/mkfs.ext4 ] || missing="$$missing e2fsprogs"; \
	if [ ! -x /usr/bin/chromium ]; then \
	  if [ "$$(id -u)" = 0 ]; then missing="$$missing chromium"; \
	  else echo "note: /usr/bin/chromium is missing, so the page's browser tests will be skipped (sudo apt-get install -y chromium)"; fi; \
	fi; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing system packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else \
	    echo "missing system packages:$$missing"; \
	    echo "run: sudo apt-get install -y$$missing"; \
	    exit 1; \
	  fi; \
	fi

$(STAMP): setup.cfg pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "broker needs Python 3.11 or newer (PYTHON=$(PYTHON))")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip "setuptools<81" wheel
	$(BIN)/python -m pip install -q -e ".[kernel,test]"
	$(BIN)/broker kernelspec install --sys-prefix
	# Semantic Kernel, for tests/test_aca_semantic_kernel.py, in a virtualenv of its own (.venv-sk)
	$(BIN)/python -m tests.aca_sk_venv
	touch $(STAMP)

kernelspec: install
	$(BIN)/broker kernelspec install --sys-prefix

# Fault, load and bad-input tests, short and long versions; their figures
# become the table of docs/reliability.md.
reliability: install
	rm -f .reliability-figures.jsonl
	BROKER_FIGURES_FILE="$(CURDIR)/.reliability-figures.jsonl" $(BIN)/python -m pytest -m "reliability or long" $(PYTEST_ARGS)
	$(BIN)/python -m tests.reliability_doc .reliability-figures.jsonl docs/reliability.md

bench: install
	$(BIN)/python bench/run_all.py

bench-quick: install
	$(BIN)/python bench/run_all.py --quick

clean:
	rm -rf $(VENV) .venv-sk build dist *.egg-info
