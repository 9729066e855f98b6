# The whole set-up on a fresh Debian machine, as root: `make run` or `make test`.
# Both install only what is missing and say nothing when nothing is.

DEBS := fuse3 pkg-config fio e2fsprogs util-linux linux-libc-dev \
        liblz4-dev libzstd-dev liblzo2-dev zlib1g-dev libxxhash-dev liburing-dev \
        systemd-container
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
SOURCES := pyproject.toml setup.py $(wildcard $(foreach d,zramfs zramfs/*,$(d)/*.py $(d)/*.pyx $(d)/*.pxi $(d)/*.pxd $(d)/*.h))
PIP := $(VENV)/bin/pip --quiet --disable-pip-version-check
# Passed to pytest by `make test`, e.g. make test PYTEST_ARGS='-k alloc -x'.
PYTEST_ARGS ?=

.PHONY: run test debs build clean install-systemd uninstall-systemd dist install uninstall

run: build
	$(VENV)/bin/zramfs daemon --default-device

test: build
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

debs:
	@missing=$$(for p in $(DEBS); do \
	    dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; \
	  done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:" $$missing; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

build: debs $(STAMP)

# Build in place with the venv's own Cython (no isolated build env to set up each time).
$(STAMP): $(SOURCES)
	@[ -x $(VENV)/bin/python ] || $(PYTHON) -m venv $(VENV)
	@echo "building zramfs into $(VENV)"
	@$(PIP) install 'setuptools>=68' wheel 'Cython>=3.0'
	@$(PIP) install --no-build-isolation --editable '.[test]'
	@touch $@

UNIT_DIR ?= /etc/systemd/system

# A wheel and an sdist in dist/, built as any Python package is (PEP 517, `python -m build`).
dist: build
	rm -rf dist
	$(VENV)/bin/python -m build --outdir dist . >/dev/null

# Outside the checkout: the package in a virtual environment of its own under PREFIX, the
# command in BINDIR, and the unit (in UNIT_DIR) running that command. `make uninstall` undoes
# it. Neither needs the checkout afterwards.
PREFIX ?= /opt/zramfs
BINDIR ?= /usr/local/bin
install: dist
	$(PYTHON) -m venv $(PREFIX)
	$(PREFIX)/bin/pip --quiet --disable-pip-version-check install dist/zramfs-*.whl
	mkdir -p $(BINDIR) $(UNIT_DIR)
	ln -sf $(abspath $(PREFIX))/bin/zramfs $(BINDIR)/zramfs
	sed 's|@PREFIX@/bin/zramfs|$(abspath $(BINDIR))/zramfs|' systemd/zramfs.service \
	    > $(UNIT_DIR)/zramfs.service
	@echo "installed: $(BINDIR)/zramfs, $(UNIT_DIR)/zramfs.service (systemctl daemon-reload)"

uninstall:
	rm -f $(BINDIR)/zramfs $(UNIT_DIR)/zramfs.service
	rm -rf $(PREFIX)

# The unit runs this checkout's .venv/bin/zramfs; /etc/zramfs.conf says which devices.
install-systemd: build
	sed 's|@PREFIX@|$(abspath $(VENV))|' systemd/zramfs.service > $(UNIT_DIR)/zramfs.service
	[ -e /etc/zramfs.conf ] || cp systemd/zramfs.conf.example /etc/zramfs.conf
	systemctl daemon-reload
	systemctl enable zramfs.service

uninstall-systemd:
	-systemctl disable --now zramfs.service
	rm -f $(UNIT_DIR)/zramfs.service
	systemctl daemon-reload

clean:
	rm -rf build dist $(VENV) zramfs/*/*.so zramfs/*/*.c *.egg-info
