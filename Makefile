# cas-snapshotter: the commands a newcomer needs.
#   make demo   install what is missing, start registry + containerd + daemon, pull and run
#   make test   everything CI runs
SHELL   := /bin/bash
CARGO   ?= cargo
PROFILE ?= debug
BIN     := $(CURDIR)/target/$(PROFILE)
CARGO_PROFILE := $(if $(filter release,$(PROFILE)),--release,)

.PHONY: all deps build check unit conformance e2e crash-test test demo demo-down bench bench-dedup bench-durability bench-journal bench-recovery bench-engine bench-layout bench-gc bench-scale bench-partial install uninstall dist-check clean

all: build

deps:
	bash scripts/deps.sh

build:
	$(CARGO) build --workspace --all-targets $(CARGO_PROFILE)

check:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets $(CARGO_PROFILE) -- -D warnings
	RUSTDOCFLAGS=-Dwarnings $(CARGO) doc --workspace --no-deps $(CARGO_PROFILE)

# Unit tests, and the tests ignored in a plain `cargo test` because they need root (real
# overlay mounts, trusted.* xattrs, an XFS loop filesystem); the ringio throughput
# benchmark stays out.
unit:
	$(CARGO) test --workspace --exclude cas-integration $(CARGO_PROFILE) -- --include-ignored --skip bench_backends

# containerd's own snapshotter conformance suite against our daemon (needs root), in the
# materialised mode first (what kernels without data-only lower layers get), then in the
# default mode, whose summary line closes the run. integration/conformance/run.sh builds
# the Go harness into target/conformance on first use (see its README).
CONFORMANCE := $(CURDIR)/integration/conformance/run.sh
conformance: build
	printf '[store]\nmount_mode = "materialised"\n' > $(CURDIR)/target/materialised.toml
	bash $(CONFORMANCE) suite '$(BIN)/cas-snapshotter --root {root} --address {sock} --config $(CURDIR)/target/materialised.toml'
	bash $(CONFORMANCE) suite '$(BIN)/cas-snapshotter --root {root} --address {sock}'

# End-to-end tests with real containerd, runc and a local registry (needs root).
e2e: build
	CAS_SNAPSHOTTER_BIN=$(BIN)/cas-snapshotter CASCTL_BIN=$(BIN)/casctl \
	  $(CARGO) test -p cas-integration --lib --bins --tests $(CARGO_PROFILE) -- --test-threads=1 --include-ignored

# The crash loop alone, as long as you like: make crash-test N=500
N ?= 100
crash-test: build
	CAS_SNAPSHOTTER_BIN=$(BIN)/cas-snapshotter CASCTL_BIN=$(BIN)/casctl CAS_CRASH_ITERATIONS=$(N) \
	  $(CARGO) test -p cas-integration --test crash $(CARGO_PROFILE) -- --nocapture --include-ignored

# Nothing may be skipped here: a test that cannot run on this machine (no root, no
# containerd 1.7/2.x from make deps, no loop device) fails instead of passing as skipped.
test: export CAS_REQUIRE_ALL_TESTS = 1
test: check unit dist-check conformance e2e
	@echo "make test: all checks, unit tests, conformance and end-to-end tests passed"

# containerd's overlayfs against ours, side by side in one containerd on a fresh XFS loop
# filesystem: bench/report.md, bench/results/bench.csv and SVG plots (needs root).
#   make bench [QUICK=1] [RUNS=3]
#              [CONTAINERD=1.6|1.7|2|DIR (default 2 when scripts/containerd-versions.sh
#               cached it, else the system's 1.6)]
#              [CAS_DIFF=0 (walking differ for both; default: cas-diff on >= 1.7.4)]
#              [CTR_LOCAL=1 (2.x: ctr images pull --local rather than the transfer service)]
#              [CASES="unpack scale-100000" BENCH_OUT=dir (only these cases, reported in dir)]
#              [DEBIAN=0 (no real-image cases: skips building the Debian images)]
#              [RATES=100mbit,1gbit (the partial-pull case's links; see bench-partial)]
# Images are generated once into $(BENCH_CACHE) and reused; the Debian images (two
# debootstrap bases, an apt-get layer over the first, zstd variants) are built by
# scripts/bench-dedup.sh the first time (a few minutes, needs the Debian mirror).
QUICK       ?=
RUNS        ?= 3
CONTAINERD  ?=
CAS_DIFF    ?= 1
CTR_LOCAL   ?=
CASES       ?=
BENCH_OUT   ?= bench
BENCH_CACHE ?= /var/cache/cas-bench
DEBIAN      ?= 1
RATES       ?= 100mbit,1gbit
bench:
	@command -v fio >/dev/null && command -v pigz >/dev/null && command -v zstd >/dev/null || $(MAKE) deps
	$(CARGO) build --release -p cas-snapshotter -p cas -p cas-integration --bins
	$(if $(filter 1,$(DEBIAN)),@command -v debootstrap >/dev/null || $(MAKE) deps)
	$(if $(filter 1,$(DEBIAN)),CAS_BENCH_CACHE=$(BENCH_CACHE) BIN=$(CURDIR)/target/release VERSIONS=2 IMAGES_ONLY=1 bash scripts/bench-dedup.sh)
	CAS_SNAPSHOTTER_BIN=$(CURDIR)/target/release/cas-snapshotter CASCTL_BIN=$(CURDIR)/target/release/casctl \
	$(CURDIR)/target/release/cas-bench perf \
	  --cache $(BENCH_CACHE) --out $(BENCH_OUT) --runs $(RUNS) $(if $(QUICK),--quick) \
	  $(if $(CONTAINERD),--containerd $(CONTAINERD)) $(if $(filter 0,$(CAS_DIFF)),--no-cas-diff) \
	  $(if $(CTR_LOCAL),--local) $(foreach c,$(CASES),--case $(c)) \
	  --conformance $(CONFORMANCE)
	$(if $(and $(filter 1,$(DEBIAN)),$(if $(CASES),,1)),CAS_SNAPSHOTTER_BIN=$(CURDIR)/target/release/cas-snapshotter CASCTL_BIN=$(CURDIR)/target/release/casctl \
	  $(CURDIR)/target/release/cas-bench partial --cache $(BENCH_CACHE) --rates $(RATES) --runs $(RUNS) --out $(BENCH_OUT)/results)

# Pulls over a shaped link (a registry in a network namespace of its own behind tbf):
# containerd's overlayfs pulling every blob against cas pulling only the files it lacks,
# for the Debian family converted to zstd:chunked; bench/results/partial.md and .csv.
#   make bench-partial [RATES=100mbit,1gbit] [RUNS=3]
bench-partial:
	$(CARGO) build --release -p cas-snapshotter -p cas -p cas-integration --bins
	@test -e $(BENCH_CACHE)/images/app-2.done || CAS_BENCH_CACHE=$(BENCH_CACHE) BIN=$(CURDIR)/target/release VERSIONS=2 IMAGES_ONLY=1 bash scripts/bench-dedup.sh
	CAS_SNAPSHOTTER_BIN=$(CURDIR)/target/release/cas-snapshotter CASCTL_BIN=$(CURDIR)/target/release/casctl \
	  $(CURDIR)/target/release/cas-bench partial --cache $(BENCH_CACHE) --rates $(RATES) --runs $(RUNS) --out bench/results

# Dedup on a family of near-duplicate Debian images, overlayfs and ours in one run:
# make bench-dedup [VERSIONS=3] [WORKDIR=/mnt/xfs/dir OUT=…]; images are cached in
# /var/cache/cas-bench.
VERSIONS ?= 3
bench-dedup:
	@command -v debootstrap >/dev/null || $(MAKE) deps
	$(CARGO) build --release -p cas-snapshotter -p cas -p cas-integration --bins
	BIN=$(CURDIR)/target/release VERSIONS=$(VERSIONS) bash scripts/bench-dedup.sh

# Durability costs alone (make bench includes them): commit record latency p50/p99 of
# both journal backends and recovery time with 1,000 committed snapshots, on an XFS loop
# filesystem made for the run (RWF_ATOMIC) and on the filesystem of /var/tmp (rename).
# GC of part of a large store while a Commit loop runs, over the GC candidates and in the
# first GC after an unclean stop: make bench-gc [OBJECTS=1000000] [GARBAGE=1]
OBJECTS ?= 200000
GARBAGE ?= 1
bench-gc:
	$(CARGO) build --release -p cas-integration --bin cas-bench
	$(CURDIR)/target/release/cas-bench gc --objects $(OBJECTS) --garbage-percent $(GARBAGE)

# Stores of growing size, each on a fresh XFS loop filesystem filled through the real
# Snapshots code: request latencies p50/p99, stats, GC of 1% with commits running, peak
# RSS, disk per object and recovery after an unclean stop, against the number of objects:
# bench/results/scale.csv and scale.svg. make bench-scale [SCALES=10000,100000,1000000,5000000]
# REPEATS=5 interleaves the sizes over five rounds of the measured steps and reports
# medians, every round (scale-rounds.csv) and each p99 against the smallest size's.
# Every size's store is kept until the end: 5 million objects take about 30 GB of disk
# (37 GB with the three smaller sizes) and, with REPEATS=5, 25 minutes.
SCALES ?= 10000,100000,1000000
REPEATS ?= 1
bench-scale:
	$(CARGO) build --release -p cas-integration --bin cas-bench -p cas --bin casctl
	$(CURDIR)/target/release/cas-bench scale --objects $(SCALES) --repeats $(REPEATS)

bench-durability:
	$(CARGO) build --release -p cas-integration --bin cas-bench
	$(CURDIR)/target/release/cas-bench durability --runs $(RUNS)
bench-journal bench-recovery: bench-durability

# The fast path alone, no containerd: each benchmark layer applied into a new store and
# again into the same store, next to single-core `gzip -dc`/`zstd -dc` and `tar -x`:
# make bench-engine [QUICK=1] [RUNS=3] [IMAGES="base-1 small"] [THREADS=1 (plain-thread workers)]
IMAGES ?=
THREADS ?=
bench-engine:
	$(CARGO) build --release -p cas-integration --bin cas-bench
	$(CURDIR)/target/release/cas-bench engine --cache $(BENCH_CACHE) --runs $(RUNS) \
	  $(if $(QUICK),--quick) $(if $(THREADS),--threads) $(if $(STUBS),--layer-metadata stubs) \
	  $(foreach i,$(IMAGES),--image $(i))

# A layer's metadata as a stub tree and as one EROFS image, side by side (needs root):
# write + sync, disk and inodes, and a cold walk through overlayfs.
# make bench-layout [RUNS=3] [FILES="5000 50000"]
FILES ?= 5000 50000
bench-layout:
	$(CARGO) build --release -p cas-integration --bin cas-bench
	$(CURDIR)/target/release/cas-bench layout --runs $(RUNS) $(foreach n,$(FILES),--files $(n))

demo:
	@command -v containerd >/dev/null && command -v docker-registry >/dev/null && command -v protoc >/dev/null || $(MAKE) deps
	$(MAKE) build
	BIN=$(BIN) bash scripts/demo.sh up

demo-down:
	BIN=$(BIN) bash scripts/demo.sh down

# Install on a node: binaries, systemd unit, default config (kept if present), and the
# containerd config snippet. make install [PREFIX=/usr/local] [DESTDIR=] [INSTALL_PROFILE=release]
PREFIX          ?= /usr/local
DESTDIR         ?=
INSTALL_PROFILE ?= release
UNITDIR         ?= /etc/systemd/system
install:
	$(CARGO) build -p cas-snapshotter -p cas --bins $(if $(filter release,$(INSTALL_PROFILE)),--release,)
	install -D -m 0755 target/$(INSTALL_PROFILE)/cas-snapshotter $(DESTDIR)$(PREFIX)/bin/cas-snapshotter
	install -D -m 0755 target/$(INSTALL_PROFILE)/casctl $(DESTDIR)$(PREFIX)/bin/casctl
	install -d $(DESTDIR)$(UNITDIR)
	sed 's|/usr/local/bin/|$(PREFIX)/bin/|' dist/cas-snapshotter.service > $(DESTDIR)$(UNITDIR)/cas-snapshotter.service
	chmod 0644 $(DESTDIR)$(UNITDIR)/cas-snapshotter.service
	test -e $(DESTDIR)/etc/cas-snapshotter/config.toml || install -D -m 0644 dist/config.toml $(DESTDIR)/etc/cas-snapshotter/config.toml
	install -D -m 0644 dist/containerd-cas.toml $(DESTDIR)$(PREFIX)/share/cas-snapshotter/containerd-cas.toml
	@echo "installed. Next: add $(PREFIX)/share/cas-snapshotter/containerd-cas.toml to /etc/containerd/config.toml,"
	@echo "then: systemctl daemon-reload && systemctl enable --now cas-snapshotter && systemctl restart containerd"

# Removes what install put in place; the config and the store (/var/lib/cas-snapshotter) stay.
uninstall:
	rm -f $(DESTDIR)$(PREFIX)/bin/cas-snapshotter $(DESTDIR)$(PREFIX)/bin/casctl
	rm -f $(DESTDIR)$(UNITDIR)/cas-snapshotter.service
	rm -rf $(DESTDIR)$(PREFIX)/share/cas-snapshotter
	@echo "kept: /etc/cas-snapshotter/config.toml and the store (remove them by hand if you mean to)"

# install/uninstall into a scratch DESTDIR, the unit checked by systemd-analyze verify.
dist-check: build
	bash scripts/dist-check.sh

clean:
	$(CARGO) clean
