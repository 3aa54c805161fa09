#!/usr/bin/env bash
# tpbpf end to end against a real cluster: the one $KUBECONFIG points at.
#
# Run by .github/workflows/e2e-kind.yml against a kind cluster. It can be
# run by hand against a DISPOSABLE cluster (it installs and uninstalls tpbpf
# cluster-wide, and creates and deletes namespace tpbpf-e2e):
#
#   cargo build -p tpbpf -p tpbpf-agent && cargo xtask image
#   (put target/image/tpbpf-agent.oci.tar into the cluster: docs/install.md)
#   sudo env "PATH=$PATH" KUBECONFIG=/path/to/kubeconfig \
#        IMAGE=localhost/tpbpf-agent:VERSION bash xtask/e2e-cluster.sh
#
# It needs root (tpbpf up loads eBPF programs), kubectl, curl and python3,
# and pods that can pull nginx and curl images. It refuses to start when
# tpbpf is already installed or namespace tpbpf-e2e exists, so it never
# removes what it did not create.
#
# Steps: deploy web (2 nginx) + client pods -> tpbpf install -> tpbpf up ->
# curl web.tpbpf-e2e from this machine -> intercept web into a local HTTP
# server -> the cluster reaches it -> rollout restart: the new pods are
# intercepted too -> leave: nginx again -> down -> uninstall -> nothing
# labelled app.kubernetes.io/part-of=tpbpf is left.
#
# Environment:
#   KUBECONFIG     the cluster (required: under sudo, ~ is root's)
#   IMAGE          the agent image (default localhost/tpbpf-agent:VERSION,
#                  VERSION from agent/Cargo.toml)
#   TPBPF          the tpbpf binary (default target/debug/tpbpf)
#   NGINX_IMAGE    default nginx:1.27-alpine
#   CURL_IMAGE     default curlimages/curl:8.11.1
#   FOLLOW_S       how long new pods may take to be intercepted (default 15)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NS=tpbpf-e2e
KUBECTL=${KUBECTL:-kubectl}
TPBPF=${TPBPF:-$ROOT/target/debug/tpbpf}
NGINX_IMAGE=${NGINX_IMAGE:-nginx:1.27-alpine}
CURL_IMAGE=${CURL_IMAGE:-curlimages/curl:8.11.1}
FOLLOW_S=${FOLLOW_S:-15}
INTERCEPT=web-80

step_no=0
step() { step_no=$((step_no + 1)); printf '\n\033[1m==> [%d] %s\033[0m\n' "$step_no" "$*"; }
say() { printf '    %s\n' "$*"; }
fail() { printf '\033[1;31mFAIL:\033[0m %s\n' "$*" >&2; exit 1; }

# The agent's version: agent/Cargo.toml, or the workspace's when inherited.
agent_version() {
    python3 - "$ROOT" <<'EOF'
import sys, tomllib
root = sys.argv[1]
pkg = tomllib.load(open(f"{root}/agent/Cargo.toml", "rb"))["package"]
v = pkg["version"]
if isinstance(v, dict):
    v = tomllib.load(open(f"{root}/Cargo.toml", "rb"))["workspace"]["package"]["version"]
print(v)
EOF
}

k() { "$KUBECTL" "$@"; }
# curl from the client pod inside the cluster; prints the body.
in_cluster_curl() { k -n "$NS" exec client -- curl -sS --max-time 5 "$1"; }

# retry SECONDS WANT CMD...: runs CMD until its output contains WANT.
retry() {
    local secs=$1 want=$2 out=""
    shift 2
    local deadline=$((SECONDS + secs))
    while :; do
        out=$("$@" 2>&1) || true
        if [[ $out == *"$want"* ]]; then
            return 0
        fi
        if ((SECONDS >= deadline)); then
            say "after ${secs}s, \`$*\` still gives:"
            printf '%s\n' "$out" | tail -5 | sed 's/^/      /' >&2
            return 1
        fi
        sleep 1
    done
}

# Running, ready pods of web not being deleted: "name ip" per line.
web_pods() {
    k -n "$NS" get pods -l app=web -o json | python3 -c '
import json, sys
for p in json.load(sys.stdin)["items"]:
    st = p.get("status", {})
    ready = any(c["type"] == "Ready" and c["status"] == "True" for c in st.get("conditions", []))
    if st.get("phase") == "Running" and ready and not p["metadata"].get("deletionTimestamp") and st.get("podIP"):
        print(p["metadata"]["name"], st["podIP"])
'
}

# --- preconditions --------------------------------------------------------
[ "$(id -u)" -eq 0 ] || fail "run as root: tpbpf up loads eBPF programs (sudo env \"PATH=\$PATH\" KUBECONFIG=... bash $0)"
[ -n "${KUBECONFIG:-}" ] || fail "set KUBECONFIG to the disposable cluster's kubeconfig"
for tool in "$KUBECTL" curl python3; do
    command -v "$tool" >/dev/null || fail "$tool is not on PATH (under sudo: sudo env \"PATH=\$PATH\" ...)"
done
[ -x "$TPBPF" ] || fail "no tpbpf binary at $TPBPF: cargo build -p tpbpf -p tpbpf-agent (or set TPBPF)"
IMAGE=${IMAGE:-localhost/tpbpf-agent:$(agent_version)}

WORK=$(mktemp -d /tmp/tpbpf-e2e.XXXXXX)
chmod 755 "$WORK"
SERVER_PID=""
INSTALLED=0
UP=0
APP=0
PASSED=0

diagnose() {
    echo "---- diagnostics ----" >&2
    k get nodes -o wide >&2 || true
    k get pods -A -o wide >&2 || true
    k -n tpbpf-system describe daemonset tpbpf-agent 2>/dev/null | tail -20 >&2 || true
    k -n tpbpf-system logs -l app=tpbpf-agent --tail=50 --prefix >&2 || true
    "$TPBPF" status >&2 || true
    tail -50 /run/tpbpf/default/tpbpfd.log >&2 2>/dev/null || true
    tail -20 "$WORK/server.log" >&2 2>/dev/null || true
}

cleanup() {
    local rc=$?
    if [ "$PASSED" != 1 ]; then
        echo "e2e failed (exit $rc) in step $step_no; cleaning up" >&2
        diagnose
    fi
    if [ -n "$SERVER_PID" ]; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    if [ "$UP" = 1 ]; then
        "$TPBPF" down || true
    fi
    if [ "$INSTALLED" = 1 ]; then
        "$TPBPF" uninstall || true
    fi
    if [ "$APP" = 1 ]; then
        k delete namespace "$NS" --wait=true --timeout=120s >/dev/null 2>&1 || true
    fi
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step "cluster: $(k config current-context) ($(k config view --minify -o jsonpath='{.clusters[0].cluster.server}'))"
k get nodes -o wide
if k get namespace tpbpf-system >/dev/null 2>&1; then
    fail "tpbpf is installed in this cluster already (namespace tpbpf-system): this test installs and uninstalls it, so it runs only on a cluster without it (\`tpbpf uninstall\` first, if it is yours to remove)"
fi
if k get namespace "$NS" >/dev/null 2>&1; then
    fail "namespace $NS exists: delete it (kubectl delete namespace $NS) or use another cluster"
fi
say "$("$TPBPF" --version), agent image $IMAGE"

# --- the test application -------------------------------------------------
step "deploy web (2 nginx replicas, Service web) and a client pod in namespace $NS"
APP=1
k apply -f - <<EOF
apiVersion: v1
kind: Namespace
metadata:
  name: $NS
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: $NS
spec:
  replicas: 2
  selector:
    matchLabels:
      app: web
  template:
    metadata:
      labels:
        app: web
    spec:
      topologySpreadConstraints:
        - maxSkew: 1
          topologyKey: kubernetes.io/hostname
          whenUnsatisfiable: ScheduleAnyway
          labelSelector:
            matchLabels:
              app: web
      containers:
        - name: nginx
          image: $NGINX_IMAGE
          ports:
            - containerPort: 80
          readinessProbe:
            httpGet:
              path: /
              port: 80
            periodSeconds: 2
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: $NS
spec:
  selector:
    app: web
  ports:
    - port: 80
      targetPort: 80
---
apiVersion: v1
kind: Pod
metadata:
  name: client
  namespace: $NS
spec:
  containers:
    - name: curl
      image: $CURL_IMAGE
      command: ["sleep", "3600"]
EOF
k -n "$NS" rollout status deployment/web --timeout=180s
k -n "$NS" wait --for=condition=Ready pod/client --timeout=180s
k -n "$NS" get pods -o wide
SERVICE_IP=$(k -n "$NS" get service web -o jsonpath='{.spec.clusterIP}')
retry 30 "Welcome to nginx" in_cluster_curl "http://web.$NS/" \
    || fail "the client pod does not reach web through its Service: the test cluster itself is not working"
say "in the cluster, web.$NS ($SERVICE_IP) answers with nginx"

# --- install and up ------------------------------------------------------
step "tpbpf install --image $IMAGE"
INSTALLED=1
"$TPBPF" install --image "$IMAGE" --timeout-s 300
k -n tpbpf-system get pods -o wide

step "tpbpf up -n $NS"
UP=1
"$TPBPF" up -n "$NS"
"$TPBPF" status

step "from this machine: curl http://web.$NS/ (by name) and http://$SERVICE_IP/"
retry 30 "Welcome to nginx" curl -sS --max-time 5 "http://web.$NS/" \
    || fail "curl http://web.$NS/ from this machine did not reach nginx through tpbpf"
retry 10 "Welcome to nginx" curl -sS --max-time 5 "http://$SERVICE_IP/" \
    || fail "curl http://$SERVICE_IP/ from this machine did not reach nginx through tpbpf"
say "both answered with nginx"

# --- intercept -------------------------------------------------------------
step "a local HTTP server with a marker, on a free port"
MARKER="tpbpf-e2e-marker-$$-$RANDOM"
mkdir -p "$WORK/site"
printf '%s\n' "$MARKER" > "$WORK/site/index.html"
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
python3 -m http.server "$PORT" --bind 127.0.0.1 --directory "$WORK/site" > "$WORK/server.log" 2>&1 &
SERVER_PID=$!
retry 10 "$MARKER" curl -sS --max-time 2 "http://127.0.0.1:$PORT/" || fail "the local HTTP server did not start"
say "http://127.0.0.1:$PORT/ serves $MARKER"

step "tpbpf intercept web --port 80:$PORT -n $NS"
"$TPBPF" intercept web --port "80:$PORT" -n "$NS"
"$TPBPF" list -n "$NS"

step "from inside the cluster, web's Service and each of its pods answer with the marker"
for i in 1 2 3 4 5 6; do
    retry 10 "$MARKER" in_cluster_curl "http://web.$NS/" \
        || fail "request $i to http://web.$NS/ from the client pod did not reach the local server"
done
mapfile -t OLD < <(web_pods)
[ "${#OLD[@]}" -eq 2 ] || fail "expected 2 ready web pods, found ${#OLD[@]}"
for line in "${OLD[@]}"; do
    read -r pod ip <<<"$line"
    retry 10 "$MARKER" in_cluster_curl "http://$ip/" || fail "pod $pod ($ip) is not intercepted"
    say "pod $pod ($ip): intercepted"
done

step "kubectl rollout restart deployment/web: the new pods are intercepted within ${FOLLOW_S}s"
k -n "$NS" rollout restart deployment/web
k -n "$NS" rollout status deployment/web --timeout=180s
# Wait until only the new pods are ready and running.
old_names=" $(printf '%s\n' "${OLD[@]}" | cut -d' ' -f1 | tr '\n' ' ')"
new_pods() { web_pods | while read -r pod ip; do [[ $old_names == *" $pod "* ]] || echo "$pod $ip"; done; }
deadline=$((SECONDS + 120))
while :; do
    mapfile -t NEW < <(new_pods)
    [ "${#NEW[@]}" -eq 2 ] && break
    ((SECONDS < deadline)) || fail "the rollout did not give 2 new ready pods in 120 s"
    sleep 1
done
rolled=$SECONDS
for line in "${NEW[@]}"; do
    read -r pod ip <<<"$line"
    left=$((rolled + FOLLOW_S - SECONDS))
    ((left > 0)) || left=1
    retry "$left" "$MARKER" in_cluster_curl "http://$ip/" \
        || fail "new pod $pod ($ip) was not intercepted within ${FOLLOW_S}s of the rollout"
    say "new pod $pod ($ip): intercepted $((SECONDS - rolled))s after the rollout finished"
done
retry 10 "$MARKER" in_cluster_curl "http://web.$NS/" \
    || fail "after the rollout, web's Service does not reach the local server"

step "tpbpf leave $INTERCEPT: nginx answers again"
"$TPBPF" leave "$INTERCEPT"
retry 10 "Welcome to nginx" in_cluster_curl "http://web.$NS/" \
    || fail "after leave, web's Service does not answer with nginx"
for line in "${NEW[@]}"; do
    read -r pod ip <<<"$line"
    retry 10 "Welcome to nginx" in_cluster_curl "http://$ip/" || fail "after leave, pod $pod ($ip) does not answer with nginx"
done
retry 10 "Welcome to nginx" curl -sS --max-time 5 "http://web.$NS/" \
    || fail "after leave, this machine does not reach nginx"
say "the cluster and this machine get nginx"

# --- down, uninstall ---------------------------------------------------------
step "tpbpf down"
"$TPBPF" down
UP=0
if "$TPBPF" status >/dev/null 2>&1; then
    fail "tpbpf status still reports a bridge after down"
fi
kill "$SERVER_PID" 2>/dev/null || true
wait "$SERVER_PID" 2>/dev/null || true
SERVER_PID=""

step "tpbpf uninstall: nothing labelled app.kubernetes.io/part-of=tpbpf is left"
"$TPBPF" uninstall
INSTALLED=0
KINDS=namespaces,serviceaccounts,clusterroles,clusterrolebindings,roles,rolebindings,daemonsets,pods
deadline=$((SECONDS + 120))
while :; do
    left=$(k get "$KINDS" -A -l app.kubernetes.io/part-of=tpbpf -o name 2>/dev/null || true)
    [ -z "$left" ] && break
    if ((SECONDS >= deadline)); then
        fail "120 s after uninstall these are left: $(echo "$left" | tr '\n' ' ')"
    fi
    sleep 2
done
say "no tpbpf object is left"

step "delete namespace $NS"
k delete namespace "$NS" --wait=true --timeout=120s
APP=0

PASSED=1
printf '\n\033[1;32mPASS\033[0m tpbpf end to end on %s\n' "$(k config current-context)"
