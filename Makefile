# The two commands a user needs: `make demo` and `make test`.
# Each installs what it needs first (Debian packages, then a virtualenv).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := fuse3 libfuse3-dev pkg-config gcc e2fsprogs fuse2fs fio attr acl strace
STAMP := $(VENV)/.installed

.PHONY: deps demo test test-quick install uninstall lint bench profile fuzz clean

deps: $(STAMP)

$(STAMP): pyproject.toml scripts/install-deps.sh
	bash scripts/install-deps.sh $(APT_PACKAGES)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: deps
	bash scripts/demo.sh

# The FUSE-level suite and the kernel-vs-ext4box differential run a second
# time on the pyfuse3 backend, so both transports keep checking each other;
# the FUSE-level suite a third time over io_uring (2 minutes; the run turns
# the kernel's enable_uring on and puts it back).
test: deps
	$(VENV)/bin/ruff check app tests bench
	$(VENV)/bin/lint-imports
	PYTHON=$(PY) bash scripts/run-tests.sh
	EXT4BOX_TEST_BACKEND=pyfuse3 PYTHON=$(PY) bash scripts/run-tests.sh tests/fuse tests/rw/test_rw_differential.py
	if [ -e /sys/module/fuse/parameters/enable_uring ]; then \
		EXT4BOX_TEST_TRANSPORT=uring PYTHON=$(PY) bash scripts/run-tests.sh tests/fuse; \
	else echo "FUSE-over-io_uring pass skipped: this kernel has no enable_uring switch"; fi

# Unit, policy, CLI and FUSE tests: no containers, no podman, no test user (root
# for the FUSE and kernel-compared tests; 6-7 minutes on 2 busy cores).
QUICK_TESTS := tests/ext4 tests/iomap tests/policy tests/cli tests/fuse tests/hostile \
	tests/test_diff_walk.py tests/test_corrupt_images.py
test-quick: deps
	$(VENV)/bin/ruff check app tests bench
	$(VENV)/bin/lint-imports
	PYTHON=$(PY) bash scripts/run-tests.sh $(QUICK_TESTS)

# ext4box for every user of this host (root): scripts/install.sh says what goes where.
# Debian packages first: pyfuse3 is built against libfuse3, the appliance needs podman.
INSTALL_PACKAGES := python3-venv fuse3 libfuse3-dev pkg-config gcc e2fsprogs podman runc uidmap catatonit
install:
	bash scripts/install-deps.sh $(INSTALL_PACKAGES)
	bash scripts/install.sh install

uninstall:
	bash scripts/install.sh uninstall

# ruff, and lint-imports: the layer contracts in pyproject.toml ([tool.importlinter]).
lint: deps
	$(VENV)/bin/ruff check app tests bench
	$(VENV)/bin/lint-imports

# The full harness (root; ~3 min, +1 the first time: the 1M-file image): figures to
# bench/results/, table and chart to docs/performance.md. BENCH_ARGS=--quick: a smoke run.
bench: deps
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) bench/run.py $(BENCH_ARGS)

# Where the server's time goes in each workload (py-spy, root): docs/performance-profiles.md.
profile: deps
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) bench/profile_server.py --doc $(PROFILE_ARGS)

# Coverage-guided fuzzing (tests/fuzz/README.md): FUZZ_SECONDS=N bounds it, FUZZ_RW=1 fuzzes rw sessions.
fuzz: deps
	$(PY) -m pip install --quiet -e '.[fuzz]'
	nice -n 10 $(PY) tests/fuzz/atheris_harness.py --seconds $${FUZZ_SECONDS:-1800} --workdir $${FUZZ_DIR:-/tmp/ext4box-fuzz} $${FUZZ_RW:+--rw}

clean:
	rm -rf $(VENV) build *.egg-info app/*.egg-info
