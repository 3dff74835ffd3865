# kvstore: build, and install as systemd services.
#
#   make                              build the release binaries (cargo build --release --bins)
#   sudo make install                 kvnode and kvctl to $(PREFIX)/bin, kvnode@.service and
#                                     kvnode.target to /etc/systemd/system, the sample config to
#                                     /etc/kvnode/cluster.toml unless one is there already; then
#                                     `systemctl daemon-reload` (only on a running systemd, and
#                                     only without DESTDIR). Nothing is started.
#   sudo make install NODES="0 1 2"   also enable those instances under kvnode.target, and the
#                                     target at boot (what `systemctl enable` would do)
#   sudo make uninstall               stop the nodes of this machine, remove the binaries, units
#                                     and enablement links; KEEP /etc/kvnode (the config) and
#                                     /var/lib/kvnode, /var/lib/private/kvnode (the data)
#
# Variables: PREFIX (/usr/local), BINDIR ($(PREFIX)/bin), DESTDIR (a staging root, for
# packages), KVNODE_BIN and KVCTL_BIN (install these prebuilt binaries instead of building).

PREFIX ?= /usr/local
BINDIR ?= $(PREFIX)/bin
UNITDIR ?= /etc/systemd/system
CONFDIR ?= /etc/kvnode
DESTDIR ?=
CARGO ?= cargo
NODES ?=
KVNODE_BIN ?= target/release/kvnode
KVCTL_BIN ?= target/release/kvctl

# Build first unless both binaries were given.
ifneq ($(filter file,$(origin KVNODE_BIN) $(origin KVCTL_BIN)),)
INSTALL_DEPS := build
endif

# Talk to systemd only when it runs this machine and we install into the real root.
SYSTEMD_LIVE = [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]

.PHONY: all build install uninstall
all: build

build:
	@if command -v $(CARGO) >/dev/null 2>&1; then \
		$(CARGO) build --release --bins; \
	elif [ -x "$(KVNODE_BIN)" ] && [ -x "$(KVCTL_BIN)" ]; then \
		echo "note: no $(CARGO) in PATH (sudo?); using the binaries already built in target/release"; \
	else \
		echo "error: $(CARGO) not found: run make as yourself first, or pass KVNODE_BIN= KVCTL_BIN=" >&2; \
		exit 1; \
	fi

install: $(INSTALL_DEPS)
	install -d -m 755 "$(DESTDIR)$(BINDIR)" "$(DESTDIR)$(UNITDIR)" "$(DESTDIR)$(CONFDIR)"
	install -m 755 "$(KVNODE_BIN)" "$(DESTDIR)$(BINDIR)/kvnode"
	install -m 755 "$(KVCTL_BIN)" "$(DESTDIR)$(BINDIR)/kvctl"
	sed 's|/usr/local/bin/kvnode|$(BINDIR)/kvnode|g' systemd/kvnode@.service \
		> "$(DESTDIR)$(UNITDIR)/.kvnode@.service.tmp"
	chmod 644 "$(DESTDIR)$(UNITDIR)/.kvnode@.service.tmp"
	mv -f "$(DESTDIR)$(UNITDIR)/.kvnode@.service.tmp" "$(DESTDIR)$(UNITDIR)/kvnode@.service"
	install -m 644 systemd/kvnode.target "$(DESTDIR)$(UNITDIR)/kvnode.target"
	@if [ -e "$(DESTDIR)$(CONFDIR)/cluster.toml" ] || [ -L "$(DESTDIR)$(CONFDIR)/cluster.toml" ]; then \
		echo "kept the existing $(DESTDIR)$(CONFDIR)/cluster.toml"; \
	else \
		echo "install -m 644 etc/kvnode/cluster.toml $(DESTDIR)$(CONFDIR)/cluster.toml"; \
		install -m 644 etc/kvnode/cluster.toml "$(DESTDIR)$(CONFDIR)/cluster.toml"; \
	fi
	@for n in $(NODES); do \
		case "$$n" in *[!0-9]*|'') echo "error: NODES must be node ids, got '$$n'" >&2; exit 1;; esac; \
		install -d -m 755 "$(DESTDIR)$(UNITDIR)/kvnode.target.wants" "$(DESTDIR)$(UNITDIR)/multi-user.target.wants"; \
		ln -sfn ../kvnode@.service "$(DESTDIR)$(UNITDIR)/kvnode.target.wants/kvnode@$$n.service"; \
		ln -sfn ../kvnode.target "$(DESTDIR)$(UNITDIR)/multi-user.target.wants/kvnode.target"; \
		echo "enabled kvnode@$$n.service (kvnode.target wants it; the target starts at boot)"; \
	done
	@if $(SYSTEMD_LIVE); then echo "systemctl daemon-reload"; systemctl daemon-reload; fi
	@echo "installed. Next: edit $(CONFDIR)/cluster.toml, then systemctl start kvnode@<id> for each node of this machine (or kvnode.target)."

uninstall:
	@if $(SYSTEMD_LIVE); then \
		echo "systemctl stop kvnode.target 'kvnode@*.service'"; \
		systemctl stop kvnode.target 'kvnode@*.service' || true; \
	fi
	rm -f "$(DESTDIR)$(BINDIR)/kvnode" "$(DESTDIR)$(BINDIR)/kvctl"
	rm -f "$(DESTDIR)$(UNITDIR)/kvnode@.service" "$(DESTDIR)$(UNITDIR)/kvnode.target"
	rm -f "$(DESTDIR)$(UNITDIR)"/*.wants/kvnode@*.service "$(DESTDIR)$(UNITDIR)"/*.wants/kvnode.target
	rmdir "$(DESTDIR)$(UNITDIR)/kvnode.target.wants" 2>/dev/null || true
	@if $(SYSTEMD_LIVE); then \
		echo "systemctl daemon-reload"; systemctl daemon-reload; \
		systemctl reset-failed 'kvnode@*.service' kvnode.target 2>/dev/null || true; \
	fi
	@echo "uninstalled. Kept: $(CONFDIR) (config) and /var/lib/kvnode, /var/lib/private/kvnode (data); remove them by hand to wipe this node."
