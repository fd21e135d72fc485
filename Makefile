# The commands a user types. `make run` and `make test` do all the set-up on a fresh Debian 12.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
VENV_STAMP := $(VENV)/.installed
BUILD := build
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' appliance/version.py)
OVA := $(BUILD)/backup-gateway-$(VERSION).ova
BUNDLE := $(BUILD)/backup-gateway-$(VERSION).bundle
RELEASE_KEY := $(BUILD)/release/release-key.pem
VCSIM := $(BUILD)/vcsim/vcsim

.PHONY: help deps venv vcsim test test-fast bench lint ova release run controlplane clean

help:
	@echo "make run        build what is missing, boot the appliance in QEMU beside the control plane"
	@echo "make test       install what is needed and run every test (unit, AWS CLI, console, VM)"
	@echo "make test-fast  the quick tests: no VM image, no browser, no long walkthrough"
	@echo "make bench      the shaper, backup, fleet and boot benchmarks (figures against baselines of the same run)"
	@echo "make ova        build $(OVA) with Packer"
	@echo "make release    the OVA and $(BUNDLE), the signed software update of this version"
	@echo "make controlplane  run the reference control plane on 127.0.0.1:8443"
	@echo "make lint       ruff"

# System packages (qemu, packer, mmdebstrap, ...); skips what is installed already.
deps:
	@tools/install-deps.sh

# deps first: libvirt-python in the lock compiles against libvirt-dev
$(VENV_STAMP): requirements.lock pyproject.toml | deps
	@command -v $(PYTHON) >/dev/null || tools/install-deps.sh
	$(PYTHON) -m venv $(VENV) || { tools/install-deps.sh && $(PYTHON) -m venv $(VENV); }
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements.lock
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

# Debian's libnbd bindings (python3-libnbd: CPython 3.11, like the venv's interpreter) made
# importable without the rest of /usr/lib/python3/dist-packages, whose other modules would
# shadow the lock's pins: a directory of symlinks to the `nbd` module's files only, named by a
# .pth in site-packages. Not part of the stamp's recipe, so existing venvs get it too.
NBD_LINKS := $(VENV)/debian-nbd
DIST := /usr/lib/python3/dist-packages

venv: $(VENV_STAMP)
	@mkdir -p $(NBD_LINKS) && ln -sfn $(DIST)/nbd.py $(NBD_LINKS)/nbd.py && \
	  for so in $(DIST)/libnbdmod*.so; do [ -e "$$so" ] && ln -sfn "$$so" $(NBD_LINKS)/; done; \
	  site=$$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))') && \
	  echo "$(abspath $(NBD_LINKS))" > "$$site/debian-nbd.pth"

lint: venv
	$(VENV)/bin/ruff check gatewaycore appliance controlplane tests tools

# The vSphere simulator for tests/hypervisors, built offline from Debian's govmomi sources;
# rebuilt only when missing or when its main.go or build script changes.
vcsim: $(VCSIM)

$(VCSIM): tools/vcsim/main.go tools/vcsim/build.sh | deps
	tools/vcsim/build.sh $@

# The tests that need no VM run on three workers (most wait on real processes, not the CPU),
# a file per worker at a time (module fixtures stay per file), except the console's, which
# type into a real pty against deadlines and run alone after them. `make test-fast` leaves
# out the single tests of 15 s or more (marker `long`: walkthroughs, kills mid-job) and the
# browser's; `make test` runs them after it, then the VM tests, each boot having the machine
# to itself.
PARALLEL := -n 3 --dist loadfile
FAST := $(PY) -m pytest -m "not vm and not browser and not long" -q $(PARALLEL) \
	--ignore=tests/console && $(PY) -m pytest -m "not vm and not browser" -q tests/console

test-fast: venv vcsim
	$(FAST)

test: deps venv lint vcsim ova
	$(FAST)
	$(PY) -m pytest -m "long and not vm" -q $(PARALLEL)
	$(PY) -m pytest -m browser -q tests/webconsole
	APPLIANCE_OVA=$(OVA) $(PY) -m pytest -m vm -q

bench: venv
	$(PY) -m tools.bench
	$(PY) -m tools.backupbench
	$(PY) -m tools.fleetbench --fleet-10k
	$(PY) -m tools.bootbench

ova: $(OVA)

$(OVA): $(shell find gatewaycore appliance systemd packer ovf tools/image -type f -not -name '*.pyc' 2>/dev/null) pyproject.toml | deps $(VENV_STAMP)
	tools/image/build-ova.sh $(VERSION) $(OVA)

# The development release key (docs/updates.md): made once, never committed (build/).
$(RELEASE_KEY): | $(VENV_STAMP)
	$(PY) -m tools.release keygen

$(BUNDLE): $(shell find gatewaycore appliance -type f -not -name '*.pyc' 2>/dev/null) $(RELEASE_KEY)
	$(PY) -m tools.release bundle --version $(VERSION) --out $(BUNDLE)

release: ova $(BUNDLE)

run: deps venv ova
	tools/run-vm.sh $(OVA)

controlplane: venv
	$(PY) -m controlplane serve --listen 127.0.0.1:8443 --state-dir $(BUILD)/controlplane

clean:
	rm -rf $(BUILD) $(VENV) .pytest_cache
