# layerd — build, test, demo, benchmarks.
# `make demo` and `make test` are the README's two set-up commands: each
# installs what it needs first (Debian packages, npm packages), as root.

SHELL := /bin/bash
NODE_MODULES_STAMP := node_modules/.layerd-installed
DEBIAN_PACKAGES := zlib1g fuse3 fuse-overlayfs attr acl skopeo umoci pigz zstd docker-registry python3 openssl curl coreutils util-linux chromium containerd runc debootstrap systemd-container stargz-snapshotter
DEBIAN_STAMP := /var/lib/layerd-build-deps.stamp
MOCHA := npx mocha --config .mocharc.json

.PHONY: all deps debian-deps build test unit integration demo bench clean install uninstall

PREFIX ?= /usr/local
LIBDIR := $(PREFIX)/lib/layerd
UNITDIR ?= /etc/systemd/system
CONFDIR ?= /etc/layerd
SYSTEMCTL ?= systemctl

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
	node dist/bench/pull.js
	node dist/bench/mount.js
	node dist/bench/rss.js
	node dist/bench/fuseFloor.js
	node dist/bench/seqRead.js
	node dist/bench/mountApi.js
	node dist/bench/containerd.js
	node dist/bench/lazy.js

clean:
	rm -rf dist

# Put the daemon, the CLI and the systemd unit in place (as root).
# SKIP_BUILD=1: install the dist/ already built (the test suite runs from it and must not see it rewritten).
install:
	@test -d node_modules || { echo "run 'make build' first"; exit 1; }
	$(if $(SKIP_BUILD),@test -d dist || { echo "SKIP_BUILD without dist/: run 'make build' first"; exit 1; },npx tsc -p tsconfig.json)
	install -d $(LIBDIR) $(PREFIX)/bin $(UNITDIR) $(CONFDIR)
	cp -a package.json package-lock.json README.md dist bin docs patches $(LIBDIR)/
# (node_modules/.: the packages themselves, also where node_modules is a symlink, as in a worktree sharing them)
	install -d $(LIBDIR)/node_modules && cp -a node_modules/. $(LIBDIR)/node_modules/
	install -d $(LIBDIR)/daemon/snapshotter && install -m 0644 daemon/snapshotter/*.proto $(LIBDIR)/daemon/snapshotter/
	ln -sf $(LIBDIR)/bin/layerd $(PREFIX)/bin/layerd
	ln -sf $(LIBDIR)/bin/layerctl $(PREFIX)/bin/layerctl
	sed -e 's|/usr/local/bin/layerd|$(PREFIX)/bin/layerd|' -e 's|/usr/local/lib/layerd|$(LIBDIR)|' -e 's|/etc/layerd/config.json|$(CONFDIR)/config.json|' systemd/layerd.service > $(UNITDIR)/layerd.service
	[ -f $(CONFDIR)/config.json ] || install -m 0644 systemd/config.json $(CONFDIR)/config.json
	-$(SYSTEMCTL) daemon-reload 2>/dev/null
	@echo "installed; start with: systemctl enable --now layerd"

# Remove what install put in place. The store (/var/lib/layerd) stays, and so
# does a configuration the admin changed (one still the default is removed).
# Containers still mounted keep their mount hosts: `layerctl rm` them first.
uninstall:
	-$(SYSTEMCTL) disable --now layerd 2>/dev/null
	rm -f $(UNITDIR)/layerd.service $(PREFIX)/bin/layerd $(PREFIX)/bin/layerctl
	rm -rf $(LIBDIR)
	if cmp -s systemd/config.json $(CONFDIR)/config.json; then rm -f $(CONFDIR)/config.json; rmdir --ignore-fail-on-non-empty $(CONFDIR); fi
	-$(SYSTEMCTL) daemon-reload 2>/dev/null
