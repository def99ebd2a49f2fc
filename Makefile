# layerd — build, test, demo, benchmarks.
# `make demo` and `make test` are the README's two set-up commands: each
# installs what it needs first (Debian packages, npm packages), as root.

SHELL := /bin/bash
NODE_MODULES_STAMP := node_modules/.layerd-installed
DEBIAN_PACKAGES := libfuse2 fuse3 fuse-overlayfs attr acl skopeo umoci pigz zstd docker-registry python3 coreutils util-linux
DEBIAN_STAMP := /var/lib/layerd-build-deps.stamp
MOCHA := npx mocha --config .mocharc.json

.PHONY: all deps debian-deps build test unit integration demo bench clean

all: build

# Debian packages the tests and the demo use (real peers, not mocks).
debian-deps:
	@if [ ! -f $(DEBIAN_STAMP) ] || ! dpkg -s $(DEBIAN_PACKAGES) >/dev/null 2>&1; then \
	  echo "installing Debian packages: $(DEBIAN_PACKAGES)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(DEBIAN_PACKAGES) >/dev/null && touch $(DEBIAN_STAMP); \
	fi

$(NODE_MODULES_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund
	@touch $@

deps: debian-deps $(NODE_MODULES_STAMP)

build: $(NODE_MODULES_STAMP)
	npx tsc -p tsconfig.json

# Unit tests: *.test.ts; integration tests (real FUSE, real tools): *.itest.ts.
test: deps build
	$(MOCHA) 'dist/test/**/*.test.js' 'dist/test/**/*.itest.js'

unit: build
	$(MOCHA) 'dist/test/**/*.test.js'

integration: deps build
	$(MOCHA) 'dist/test/**/*.itest.js'

demo: deps build
	./docs/demo.sh

bench: deps build
	node dist/bench/import.js

clean:
	rm -rf dist
