# wxsidecar: `make demo` to see it work, `make test` to check everything.
CARGO ?= cargo
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Debian packages the build and the tests need: cmake for pingora's zlib-ng,
# a C compiler, redis-server for the shared-store tests, tinyproxy for the
# forward-proxy tests.
DEPS := cmake:cmake cc:build-essential redis-server:redis-server curl:curl tinyproxy:tinyproxy

.PHONY: demo test docs bench soak install-deps install-bench-deps build fmt clippy

install-deps:
	@missing=""; for d in $(DEPS); do cmd=$${d%%:*}; pkg=$${d##*:}; \
	  command -v $$cmd >/dev/null 2>&1 || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi
	@# Kubernetes schema check for conf/k8s (PyPI).
	@python3 -c 'import kubernetes_validate' 2>/dev/null || python3 -m pip install -q --disable-pip-version-check kubernetes-validate

build: install-deps
	$(CARGO) build --release

demo: build
	./target/release/wxsidecar demo

fmt:
	$(CARGO) fmt --all --check

clippy: install-deps
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	@# The product alone, without the fake WeChat's dependencies.
	$(CARGO) clippy --no-default-features -- -D warnings

# Most integration tests wait on real time (token lifetimes, deadlines), not
# on the CPU: six at once halves the wall time on two cores.
TEST_THREADS ?= 6

test: install-deps fmt clippy
	RUST_TEST_THREADS=$(TEST_THREADS) $(CARGO) test --workspace

# The configuration reference, generated from crates/config/src/keys.rs (a test
# fails when docs/configuration.md differs from it).
docs:
	$(CARGO) run -q -- check --reference > docs/configuration.md

# Benchmark tools from Debian: the contenders and the load generator.
install-bench-deps: install-deps
	@missing=""; for d in nginx:nginx-light haproxy:haproxy wrk:wrk openssl:openssl; do cmd=$${d%%:*}; pkg=$${d##*:}; \
	  command -v $$cmd >/dev/null 2>&1 || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

# Every benchmark, one report: BENCHMARKS.md (about 10 minutes).
bench: install-bench-deps
	benches/run-all.sh

# Soak and abuse run against a release build (bounded: SOAK_SECONDS, 600 by
# default): mixed traffic with revocations, resets and a Redis restart,
# 10,000 idle and 200 slowloris connections, an admin refresh storm.
SOAK_SECONDS ?= 600
soak: install-deps
	$(CARGO) build --release
	python3 benches/soak.py --seconds $(SOAK_SECONDS)
