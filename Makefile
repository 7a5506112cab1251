# wxsidecar: `make demo` to see it work, `make test` to check everything.
CARGO ?= cargo
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Debian packages the build and the tests need: cmake for pingora's zlib-ng,
# a C compiler, redis-server for the shared-store tests.
DEPS := cmake:cmake cc:build-essential redis-server:redis-server curl:curl

.PHONY: demo test install-deps build fmt clippy unit

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
	$(CARGO) fmt --check

clippy: install-deps
	$(CARGO) clippy --all-targets -- -D warnings

test: install-deps fmt clippy
	$(CARGO) test
