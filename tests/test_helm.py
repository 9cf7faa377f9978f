"""Checks of the Helm chart helm/flowact without a cluster.

helm lint --strict; helm template of every ci/*-values.yaml scenario, each object validated
strictly against the Kubernetes schemas (kubernetes-validate) and the Prometheus Operator and
Gateway API CRD schemas (helm/tools/validate-crds.js; Envoy Gateway's BackendTrafficPolicy has no
schema package on npm or PyPI: the fields of its BackendTrafficPolicy and EnvoyExtensionPolicy are
asserted here); promtool on the rendered rules, plus a promtool rule test
(helm/tests/rules-test.yaml) of the HPA metric as recording rule and as prometheus-adapter query;
assertions on the rendered objects (probes, drain, grace period, GPU, HPA, security).

The tools (helm v3, promtool, node validators) are installed by helm/tools/install.sh into the
git-ignored tools/ folder; when that fails these tests fail, they do not skip.
This module knows nothing about the serving code: it checks the chart against the image's CLI
contract (ports, GET /ready on the health port, `flowact drain`, FLOWACT_DRAIN_FILE).
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "flowact"
TOOLS = REPO / "tools"
INSTALL = REPO / "helm" / "tools" / "install.sh"
CRD_VALIDATOR = REPO / "helm" / "tools" / "validate-crds.js"
RULES_TEST = REPO / "helm" / "tests" / "rules-test.yaml"

RELEASE, NAMESPACE = "flowact", "default"  # rules-test.yaml's sample series carry these
K8S_VERSION = "1.31"
SCENARIOS = sorted(p.name.removesuffix("-values.yaml") for p in (CHART / "ci").glob("*-values.yaml"))
CRD_GROUPS = ("monitoring.coreos.com/", "gateway.networking.k8s.io/", "gateway.envoyproxy.io/")
SCHEMALESS_CRDS = ("BackendTrafficPolicy", "EnvoyExtensionPolicy")  # Envoy Gateway's: no npm or PyPI package has their schemas
PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002, "health": 8003}


# ---------------------------------------------------------------------------------------------
# Tools and rendering
# ---------------------------------------------------------------------------------------------

def _run(args: list, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120, **kw)


@pytest.fixture(scope="session")
def tools() -> dict[str, Path]:
    """helm, promtool and the CRD validator, installed on first use (fails, never skips)."""
    proc = _run(["bash", INSTALL])
    if proc.returncode != 0:
        pytest.fail(f"helm/tools/install.sh failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}")
    paths = {"helm": TOOLS / "bin" / "helm", "promtool": TOOLS / "bin" / "promtool",
             "node": Path(shutil.which("node") or "node")}
    for name, path in paths.items():
        assert path.exists(), f"{name} missing after install.sh: {path}"
    return paths


def helm_template(tools, *values_files: Path, set_values: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    args = [tools["helm"], "template", RELEASE, CHART, "--namespace", NAMESPACE]
    for f in values_files:
        args += ["-f", f]
    for s in set_values:
        args += ["--set", s]
    return _run(args)


def render(tools, *values_files: Path, set_values: tuple[str, ...] = ()) -> list[dict]:
    proc = helm_template(tools, *values_files, set_values=set_values)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


@pytest.fixture(scope="session")
def rendered(tools) -> dict[str, list[dict]]:
    """Scenario name -> rendered objects (the helm test pod included)."""
    return {s: render(tools, CHART / "ci" / f"{s}-values.yaml") for s in SCENARIOS}


def one(objs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(objs: list[dict], name: str = "triton") -> dict:
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] + pod.get("initContainers", []) if c["name"] == name)


# ---------------------------------------------------------------------------------------------
# Lint and schemas
# ---------------------------------------------------------------------------------------------

def test_scenarios_present():
    assert set(SCENARIOS) >= {"default", "autoscaling", "tls", "gateway"}


@pytest.mark.parametrize("scenario", [None] + SCENARIOS)
def test_helm_lint_strict(tools, scenario):
    args = [tools["helm"], "lint", "--strict", CHART]
    if scenario:
        args += ["-f", CHART / "ci" / f"{scenario}-values.yaml"]
    proc = _run(args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[WARNING]" not in proc.stdout and "[ERROR]" not in proc.stdout


@pytest.mark.parametrize("bad, message", [
    ("bogusKey=1", "Additional property bogusKey is not allowed"),
    ("modelRepository.target=onnx", "modelRepository.target"),
    ("modelRepository.device=cpu", "modelRepository.device"),
    ("streams.capacity=0", "streams.capacity"),
    ("drain.deadlineSeconds=-5", "drain.deadlineSeconds"),
    ("streams.requireRandomIds=maybe", "streams.requireRandomIds"),
    ("shm.sizeLimit=8GB", "shm.sizeLimit"),
    ("tls.enabled=true", "then"),  # TLS needs a secret
    ("gateway.enabled=true", "gateway.parentRef.name"),
    ("gateway.streamIdleTimeout=65", "gateway.streamIdleTimeout"),
])
def test_values_schema_rejects(tools, bad, message):
    proc = helm_template(tools, set_values=(bad,))
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr


def test_every_values_key_has_a_comment():
    """A comment line directly above each key, or a trailing comment (list items included)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    missing = []
    for i, line in enumerate(lines):
        m = re.match(r"^\s*(?:- )?([A-Za-z][\w.-]*):", line)
        if not m or "#" in line:
            continue
        prev = lines[i - 1].strip() if i else ""
        if not prev.startswith("#"):
            missing.append(f"line {i + 1}: {m.group(1)}")
    assert not missing, "values.yaml keys without a comment:\n" + "\n".join(missing)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_kubernetes_schemas_strict(rendered, scenario):
    errors, checked = [], 0
    for obj in rendered[scenario]:
        if obj["apiVersion"].startswith(CRD_GROUPS):
            continue
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
            checked += 1
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {str(e).splitlines()[0]} at {list(e.path)}")
    assert not errors, "\n".join(errors)
    assert checked >= 6


def _validate_crds(tools, objs: list[dict]) -> dict:
    proc = _run([tools["node"], CRD_VALIDATOR], input=json.dumps(objs))
    assert proc.returncode in (0, 1), proc.stderr
    return json.loads(proc.stdout)


def test_crd_schemas_strict(tools, rendered):
    crds = [o for s in SCENARIOS for o in rendered[s] if o["apiVersion"].startswith(CRD_GROUPS)]
    assert {o["kind"] for o in crds} == {"ServiceMonitor", "PrometheusRule", "GRPCRoute", *SCHEMALESS_CRDS}
    crds = [o for o in crds if o["kind"] not in SCHEMALESS_CRDS]
    report = _validate_crds(tools, crds)
    assert report == {"checked": len(crds), "errors": []}


def test_crd_validator_is_strict(tools, rendered):
    """The validator catches a misplaced field and a wrong type, not only a missing one."""
    sm = json.loads(json.dumps(one(rendered["autoscaling"], "ServiceMonitor")))
    sm["spec"]["endpoints"][0]["intervall"] = "15s"
    sm["spec"]["endpoints"][0]["port"] = 8002
    errors = _validate_crds(tools, [sm])["errors"]
    assert any("/spec/endpoints/0/intervall unknown field" in e for e in errors), errors
    assert any("/spec/endpoints/0/port type" in e for e in errors), errors
    route = json.loads(json.dumps(one(rendered["gateway"], "GRPCRoute")))
    route["spec"]["rules"][0]["backendRefs"][0]["prot"] = 8001
    route["spec"]["rules"][0]["matches"][0]["method"]["type"] = "Prefix"
    errors = _validate_crds(tools, [route])["errors"]
    assert any("/spec/rules/0/backendRefs/0/prot unknown field" in e for e in errors), errors
    assert any("/spec/rules/0/matches/0/method/type enum" in e for e in errors), errors


# ---------------------------------------------------------------------------------------------
# Prometheus rules and the adapter
# ---------------------------------------------------------------------------------------------

def _adapter_rules(objs: list[dict]) -> dict[str, dict]:
    cm = one(objs, "ConfigMap", f"{RELEASE}-prometheus-adapter")
    return {r["name"]["as"]: r for r in yaml.safe_load(cm["data"]["config.yaml"])["rules"]}


def _fill_adapter_query(rule: dict, pods: list[str]) -> str:
    """What prometheus-adapter sends to Prometheus for an HPA pods-metric request."""
    series = re.match(r"[a-zA-Z_:][\w:]*", rule["seriesQuery"]).group(0)
    matchers = f'namespace="{NAMESPACE}",pod=~"{"|".join(pods)}"'
    q = rule["metricsQuery"].replace("<<.Series>>", series).replace("<<.LabelMatchers>>", matchers)
    q = q.replace("<<.GroupBy>>", "pod")
    assert "<<" not in q, q
    return q


@pytest.fixture(scope="session")
def rules_dir(tmp_path_factory, rendered) -> Path:
    objs = rendered["autoscaling"]
    d = tmp_path_factory.mktemp("rules")
    (d / "rules.yaml").write_text(yaml.safe_dump(one(objs, "PrometheusRule")["spec"]))
    adapter = _adapter_rules(objs)
    test = yaml.safe_load(RULES_TEST.read_text())
    for group in test["tests"]:
        for t in group.get("promql_expr_test", []):
            m = re.fullmatch(r"ADAPTER_QUERY\((\w+)\)", t["expr"])
            if m:
                t["expr"] = _fill_adapter_query(adapter[m.group(1)], ["flowact-a", "flowact-b", "flowact-c"])
    (d / "rules-test.yaml").write_text(yaml.safe_dump(test, sort_keys=False))
    return d


def test_promtool_check_rules(tools, rules_dir):
    proc = _run([tools["promtool"], "check", "rules", rules_dir / "rules.yaml"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    groups = yaml.safe_load((rules_dir / "rules.yaml").read_text())["groups"]
    assert [g["name"] for g in groups] == ["flowact.recording", "flowact.alerts"]
    assert f"SUCCESS: {sum(len(g['rules']) for g in groups)} rules found" in proc.stdout, proc.stdout


def test_promtool_rule_tests(tools, rules_dir):
    """HPA metric as recording rule and as adapter query agree on sample series; alerts fire."""
    assert "ADAPTER_QUERY" not in (rules_dir / "rules-test.yaml").read_text()
    proc = _run([tools["promtool"], "test", "rules", "rules-test.yaml"], cwd=rules_dir)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_adapter_rules_serve_the_hpa_metrics(rendered):
    objs = rendered["autoscaling"]
    hpa_metrics = {m["pods"]["metric"]["name"] for m in one(objs, "HorizontalPodAutoscaler")["spec"]["metrics"]}
    adapter = _adapter_rules(objs)
    assert hpa_metrics == {"flowact_stream_utilization", "flowact_queue_seconds"} <= set(adapter)
    for rule in adapter.values():
        assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
        assert "<<.LabelMatchers>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]


def test_recording_rules_scoped_to_release(rendered):
    groups = one(rendered["autoscaling"], "PrometheusRule")["spec"]["groups"]
    selector = f'namespace="{NAMESPACE}",service="{RELEASE}"'
    for rule in groups[0]["rules"]:
        raw = re.findall(r"\b(flowact_\w+|nv_\w+)\{([^}]*)\}", rule["expr"])
        assert all(selector in labels for _, labels in raw), rule


# ---------------------------------------------------------------------------------------------
# Rendered objects
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scenario", SCENARIOS)
def test_probes(rendered, scenario):
    c = container(rendered[scenario])
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "health"}  # flowact serve --health-port
    assert c["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert c["startupProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 15 * 60  # engine loading
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == PORTS


@pytest.mark.parametrize("scenario, deadline, margin", [("default", 600, 60), ("autoscaling", 1800, 45)])
def test_drain_and_grace_period(rendered, scenario, deadline, margin):
    objs = rendered[scenario]
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    c = container(objs)
    assert c["lifecycle"]["preStop"]["exec"]["command"] == [
        "flowact", "drain", "--deadline", str(deadline), "--metrics-url", "http://127.0.0.1:8002/metrics"]
    assert pod["terminationGracePeriodSeconds"] == deadline + margin
    # After preStop, SIGTERM drains what is left for --drain-timeout; the margin covers it plus Triton's stop.
    args = c["args"]
    assert args[args.index("--drain-timeout") + 1] == "10" and margin >= 10 + 15
    assert ("--require-random-ids" in args) == (scenario == "autoscaling")
    env = {e["name"]: e.get("value") for e in c["env"]}
    drain_file = env["FLOWACT_DRAIN_FILE"]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    run_mount = next(p for p in mounts if drain_file.startswith(p + "/"))
    assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == mounts[run_mount])
    # A stale drain flag from a restarted container is cleared before the server starts.
    assert c["command"][:2] == ["/bin/sh", "-c"] and c["command"][2].startswith('rm -f "$FLOWACT_DRAIN_FILE" && exec flowact serve')


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_serve_command(rendered, scenario):
    args = container(rendered[scenario])["args"]
    flags = dict(zip(args[:14:2], args[1:14:2]))
    assert flags == {"--preset": "r1-480p", "--repository": flags["--repository"], "--grpc-port": "8001",
                     "--http-port": "8000", "--metrics-port": "8002", "--health-port": "8003", "--host": "0.0.0.0"}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_gpu_shm_and_resources(rendered, scenario):
    objs = rendered[scenario]
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    c = container(objs)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["resources"]["requests"]["memory"] and c["resources"]["limits"]["memory"]
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    assert {"mountPath": "/dev/shm", "name": "dshm"} in c["volumeMounts"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_security_context(rendered, scenario):
    objs = rendered[scenario]
    pods = [one(objs, "Deployment")["spec"]["template"]["spec"], one(objs, "Pod")["spec"]]
    for pod in pods:
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        volumes = {v["name"]: v for v in pod["volumes"]}
        for c in pod["containers"] + pod.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["allowPrivilegeEscalation"] is False and sc["privileged"] is False
            assert sc["capabilities"] == {"drop": ["ALL"]}
            # Every writable mount is pod-local scratch or the engine cache.
            for m in c["volumeMounts"]:
                if not m.get("readOnly"):
                    v = volumes[m["name"]]
                    assert "emptyDir" in v or m["name"] == "engine-cache", m
            assert "/tmp" in {m["mountPath"] for m in c["volumeMounts"]}
            # The working directory (where `flowact serve` writes ./artifacts) is writable.
            if "workingDir" in c:
                assert any(c["workingDir"] == m["mountPath"] and not m.get("readOnly") for m in c["volumeMounts"])


def test_export_init_container_keys_engine_cache(rendered):
    objs = rendered["default"]
    init = container(objs, "prepare-repository")
    assert init["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = {e["name"]: e["value"] for e in init["env"]}
    assert env["FLOWACT_TARGET"] == "trt" and env["FLOWACT_PRESET"] == "r1-480p"
    assert env["FLOWACT_DEVICE"] == "cuda:0" and env["FLOWACT_CAPACITY"] == "" and env["FLOWACT_PRECISION"] == ""  # flowact's defaults
    assert container(objs)["args"][3] == env["FLOWACT_REPOSITORY_LINK"]
    script = one(objs, "ConfigMap", f"{RELEASE}-scripts")["data"]["prepare-repository.sh"]
    assert "nvidia-smi --query-gpu=name --format=csv,noheader" in script
    assert 'key="$FLOWACT_PRESET-$FLOWACT_TARGET/$gpu_key/$build-$args_key"' in script
    assert "flowact export repository" in script and "mv -T" in script
    # Shared cache in the autoscaling scenario, read-only for the server.
    pod = one(rendered["autoscaling"], "Deployment")["spec"]["template"]["spec"]
    cache = next(v for v in pod["volumes"] if v["name"] == "engine-cache")
    assert cache["persistentVolumeClaim"] == {"claimName": "flowact-engine-cache"}
    assert {"name": "engine-cache", "mountPath": "/var/cache/flowact", "readOnly": True} in pod["containers"][0]["volumeMounts"]


def test_torch_target_with_capacity(tools):
    """The torch target on the pod's GPU, admitting the streams measured real time on it."""
    objs = render(tools, set_values=("modelRepository.target=torch", "streams.capacity=3"))
    init = container(objs, "prepare-repository")
    env = {e["name"]: e["value"] for e in init["env"]}
    assert (env["FLOWACT_TARGET"], env["FLOWACT_DEVICE"], env["FLOWACT_CAPACITY"]) == ("torch", "cuda:0", "3")
    assert container(objs)["resources"]["limits"]["nvidia.com/gpu"] == 1


def _cache_key(*export_args: str) -> str:
    """The init script's key suffix for these `flowact export repository` arguments."""
    lines = "".join(f"{a}\n" for a in export_args) or "\n"  # printf '%s\n' with no arguments prints one newline
    return hashlib.sha256(lines.encode()).hexdigest()[:12]


def _fake_export_env(rendered, tmp_path: Path, race: bool = False) -> tuple[Path, dict]:
    """The init script plus fake nvidia-smi and flowact; with race, another pod publishes first."""
    script = tmp_path / "prepare.sh"
    script.write_text(one(rendered["default"], "ConfigMap", f"{RELEASE}-scripts")["data"]["prepare-repository.sh"])
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3'\n")
    other_pod = (f'd="$FLOWACT_CACHE_DIR/r1-480p-trt/NVIDIA-H100-80GB-HBM3/abc123-{_cache_key("--device", "cuda:0")}"; '
                 'mkdir -p "$d/repository/other" && echo other > "$d/complete"\n') if race else ""
    (bin_dir / "flowact").write_text(
        '#!/bin/sh\necho "$@" >> "$FAKE_LOG"\nwhile [ $# -gt 0 ]; do [ "$1" = --out ] && out="$2"; shift; done\n'
        'mkdir -p "$out/flowact/1" && echo ok > "$out/flowact/config.pbtxt"\n' + other_pod)
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "FAKE_LOG": str(tmp_path / "log"), "FLOWACT_PRESET": "r1-480p",
           "FLOWACT_TARGET": "trt", "FLOWACT_CACHE_DIR": str(tmp_path / "cache"),
           "FLOWACT_REPOSITORY_LINK": str(tmp_path / "repository"), "FLOWACT_BUILD_ID": "abc123"}
    return script, env


def test_prepare_repository_script(rendered, tmp_path):
    """Run the init script with a fake nvidia-smi and flowact: builds once, then reuses; other export
    arguments (here a checkpoint) are another key, so they build again."""
    script, env = _fake_export_env(rendered, tmp_path)
    env["FLOWACT_CAPACITY"] = "3"
    for _ in range(2):
        proc = _run(["/bin/sh", script, "--checkpoint", "/w/x.safetensors"], env=env)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    export_args = ("--capacity", "3", "--device", "cuda:0", "--checkpoint", "/w/x.safetensors")
    built = tmp_path / "cache" / "r1-480p-trt" / "NVIDIA-H100-80GB-HBM3" / f"abc123-{_cache_key(*export_args)}"
    assert (tmp_path / "repository").resolve() == (built / "repository").resolve()
    assert (tmp_path / "repository" / "flowact" / "config.pbtxt").read_text() == "ok\n"
    assert "found cached repository" in proc.stdout
    calls = (tmp_path / "log").read_text().splitlines()
    assert len(calls) == 1 and calls[0].startswith("export repository --preset r1-480p --target trt --out ")
    assert calls[0].endswith(" ".join(export_args))
    assert not list((tmp_path / "cache").glob(".build-*"))
    proc = _run(["/bin/sh", script, "--checkpoint", "/w/y.safetensors"], env=env)
    assert proc.returncode == 0 and "building" in proc.stdout, proc.stdout + proc.stderr
    assert len((tmp_path / "log").read_text().splitlines()) == 2


def test_prepare_repository_script_embedded_runs_on_the_cpu(rendered, tmp_path):
    """embedded: no --device (its stream model runs ONNX Runtime on the CPU), no GPU in the key."""
    script, env = _fake_export_env(rendered, tmp_path)
    env["FLOWACT_TARGET"], env["FLOWACT_DEVICE"], env["FLOWACT_PRECISION"] = "embedded", "cuda:0", "int8"
    proc = _run(["/bin/sh", script], env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    call = (tmp_path / "log").read_text()
    assert call.startswith("export repository --preset r1-480p --target embedded --out ") and "--device" not in call
    assert call.rstrip().endswith("--precision int8")  # the precision is part of the cache key
    built = tmp_path / "cache" / "r1-480p-embedded" / "any" / f"abc123-{_cache_key('--precision', 'int8')}"
    assert (tmp_path / "repository").resolve() == (built / "repository").resolve()


def test_prepare_repository_script_lost_race(rendered, tmp_path):
    """Two pods build the same key at once: the loser discards its build and uses the winner's."""
    script, env = _fake_export_env(rendered, tmp_path, race=True)
    proc = _run(["/bin/sh", script], env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "another pod cached" in proc.stdout
    assert (tmp_path / "repository" / "other").is_dir()
    assert not list((tmp_path / "cache").glob(".build-*"))


def test_hpa(rendered):
    objs = rendered["autoscaling"]
    hpa = one(objs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": RELEASE}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 16)
    util = hpa["spec"]["metrics"][0]
    assert util == {"type": "Pods", "pods": {"metric": {"name": "flowact_stream_utilization"},
                                             "target": {"type": "AverageValue", "averageValue": "800m"}}}
    assert hpa["spec"]["behavior"]["scaleDown"]["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 300}]
    assert "replicas" not in one(objs, "Deployment")["spec"]  # the HPA owns it
    assert one(rendered["default"], "Deployment")["spec"]["replicas"] == 2
    assert not [o for o in rendered["default"] if o["kind"] == "HorizontalPodAutoscaler"]


def test_services(rendered):
    objs = rendered["default"]
    svc = one(objs, "Service", RELEASE)
    assert {p["name"]: (p["port"], p["targetPort"]) for p in svc["spec"]["ports"]} == {
        n: (port, n) for n, port in PORTS.items() if n != "health"}  # the gateway checks each pod's, not the Service's
    headless = one(objs, "Service", f"{RELEASE}-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"] == svc["spec"]["selector"]
    # The ServiceMonitor scrapes only the main Service (one scrape per pod).
    sm = one(rendered["autoscaling"], "ServiceMonitor")
    labels = sm["spec"]["selector"]["matchLabels"]
    assert labels.items() <= svc["metadata"]["labels"].items()
    assert not labels.items() <= headless["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"


def test_pdb_and_network_policy(rendered):
    pdb = one(rendered["default"], "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    deploy = one(rendered["default"], "Deployment")
    assert pdb["spec"]["selector"]["matchLabels"] == deploy["spec"]["selector"]["matchLabels"]
    assert not [o for o in rendered["default"] if o["kind"] == "NetworkPolicy"]
    netpol = one(rendered["autoscaling"], "NetworkPolicy")
    grpc_rule, metrics_rule = netpol["spec"]["ingress"]
    assert [p["port"] for p in grpc_rule["ports"]] == ["grpc", "http", "health"]
    test_pod_labels = one(rendered["autoscaling"], "Pod")["metadata"]["labels"]
    assert any(peer.get("podSelector", {}).get("matchLabels", {}).items() <= test_pod_labels.items()
               for peer in grpc_rule["from"] if "podSelector" in peer)
    assert metrics_rule["from"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}


def test_tls(tools, rendered):
    objs = rendered["tls"]
    c = container(objs)
    triton_args = c["args"][c["args"].index("--") + 1:]
    assert triton_args == ["--grpc-use-ssl=true", "--grpc-server-cert=/etc/flowact/tls/tls.crt",
                           "--grpc-server-key=/etc/flowact/tls/tls.key", "--grpc-use-ssl-mutual=true",
                           "--grpc-root-cert=/etc/flowact/tls/ca.crt", "--log-verbose=0"]
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    assert {"name": "tls", "secret": {"secretName": "flowact-grpc-tls", "defaultMode": 0o440}} in pod["volumes"]
    assert "initContainers" not in pod  # prebuilt repository from a volume
    assert c["args"][3] == "/models/r1-480p/trt"
    test_pod = one(objs, "Pod")["spec"]
    assert {"name": "tls", "secret": {"secretName": "flowact-grpc-test-client", "defaultMode": 0o440}} in test_pod["volumes"]
    env = {e["name"]: e["value"] for e in test_pod["containers"][0]["env"]}
    assert env["FLOWACT_TEST_TLS"] == "1" and env["FLOWACT_TEST_MUTUAL"] == "1"
    assert "--" not in container(rendered["default"])["args"]
    proc = helm_template(tools, set_values=("tls.enabled=true", "tls.secretName=s", "tls.mutual=true"))
    assert proc.returncode != 0 and "tls.testClientSecretName" in proc.stderr


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_helm_test_pod_checks_grpc_readiness(rendered, scenario):
    pod = one(rendered[scenario], "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    c = pod["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["FLOWACT_TEST_URL"] == f"{RELEASE}.{NAMESPACE}.svc:8001"
    code = c["command"][2]
    compile(code, "test-grpc-ready", "exec")
    assert 'is_model_ready("flowact")' in code and "is_server_ready()" in code


# ---------------------------------------------------------------------------------------------
# The admin key and the serving contract (flowact.contract is torch-free: names only)
# ---------------------------------------------------------------------------------------------

def _admin_env(objs: list[dict]) -> dict | None:
    return next((e for e in container(objs)["env"] if e["name"] == "FLOWACT_ADMIN_KEY"), None)


def test_admin_key_comes_from_a_secret(rendered):
    import base64

    from flowact.contract import ADMIN_KEY_ALPHABET, ADMIN_KEY_ENV, ADMIN_KEY_MIN_CHARS

    # default: no key, so `flowact serve` keeps a random one and the admin protocols stay closed
    assert _admin_env(rendered["default"]) is None and not [o for o in rendered["default"] if o["kind"] == "Secret"]
    # create: a Secret the chart makes and keeps (uninstall, upgrades: looked up), valid for `flowact serve`
    secret = one(rendered["autoscaling"], "Secret", f"{RELEASE}-admin-key")
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    key = base64.b64decode(secret["data"]["admin-key"]).decode()
    assert len(key) >= ADMIN_KEY_MIN_CHARS and set(key) <= set(ADMIN_KEY_ALPHABET)
    env = _admin_env(rendered["autoscaling"])
    assert env == {"name": ADMIN_KEY_ENV, "valueFrom": {"secretKeyRef": {"name": f"{RELEASE}-admin-key", "key": "admin-key"}}}
    # existingSecret: the operator's own Secret, nothing created
    assert _admin_env(rendered["tls"])["valueFrom"]["secretKeyRef"] == {"name": "flowact-admin", "key": "key"}
    assert not [o for o in rendered["tls"] if o["kind"] == "Secret"]
    # the key never goes to the export init container or the test pod
    for scenario in SCENARIOS:
        pods = [one(rendered[scenario], "Pod")["spec"]]
        deploy = one(rendered[scenario], "Deployment")["spec"]["template"]["spec"]
        for c in deploy.get("initContainers", []) + pods[0]["containers"]:
            assert all(e["name"] != ADMIN_KEY_ENV for e in c.get("env", [])), (scenario, c["name"])


def test_admin_key_secret_is_kept_across_upgrades():
    template = (CHART / "templates" / "admin-key-secret.yaml").read_text()
    assert 'lookup "v1" "Secret" .Release.Namespace $name' in template
    assert "index $previous.data .Values.adminKey.secretKey" in template


def test_prometheus_rule_uses_only_published_metrics_and_alerts_on_what_matters(rendered):
    from flowact.contract import METRICS

    groups = one(rendered["autoscaling"], "PrometheusRule")["spec"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    used = {m for r in rules for m in re.findall(r"\b(flowact_\w+)\{", r["expr"])}
    assert used <= set(METRICS), used - set(METRICS)
    assert used == set(METRICS) - {"flowact_streams_resumed_total", "flowact_streams_ended_total"}
    recorded = {r["record"]: r["expr"] for r in rules if "record" in r}
    alerts = {r["alert"]: r["expr"] for r in rules if "alert" in r}

    def source(expr: str) -> set[str]:
        """The metric families behind an alert expression (through the recording rules)."""
        names = set(re.findall(r"\b(flowact_\w+)\{", expr))
        for rec in re.findall(r"\b(flowact:[\w:]+)", expr):
            names |= source(recorded[rec])
        return names

    covers = {"chunk latency": "flowact_chunk_latency_seconds_sum", "time to first frame": "flowact_ttff_seconds_sum",
              "rejections": "flowact_streams_rejected_total", "evictions": "flowact_streams_evicted_total",
              "invalid requests": "flowact_requests_invalid_total", "saturation": "flowact_stream_capacity",
              "stuck streams": "flowact_chunks_total"}
    for what, metric in covers.items():
        assert any(metric in source(expr) for expr in alerts.values()), f"no alert on {what} ({metric})"


# ---------------------------------------------------------------------------------------------
# The gateway (Gateway API GRPCRoute + Envoy Gateway BackendTrafficPolicy)
# ---------------------------------------------------------------------------------------------

def test_gateway_only_when_enabled(rendered):
    for scenario in ("default", "autoscaling", "tls"):
        assert not [o for o in rendered[scenario] if o["kind"] in ("GRPCRoute", *SCHEMALESS_CRDS)]


def test_gateway_routes_streams_least_request_with_readiness_checks(rendered):
    """The same routing as `flowact gateway`: the route to the headless Service's gRPC port, least request,
    each pod's /ready on its health port (the port `flowact serve --health-port` listens on), panic routing
    off, no request timeout, a stream idle timeout above Triton's sequence timeout (2 x the 30 s TTL)."""
    objs = rendered["gateway"]
    route, policy = one(objs, "GRPCRoute"), one(objs, "BackendTrafficPolicy")
    headless = one(objs, "Service", "flowact-headless")
    backend = route["spec"]["rules"][0]["backendRefs"][0]
    assert (backend["kind"], backend["name"]) == ("Service", headless["metadata"]["name"])
    assert backend["port"] == next(p["port"] for p in headless["spec"]["ports"] if p["name"] == "grpc") == PORTS["grpc"]
    assert route["spec"]["parentRefs"][0]["name"] == "avatars"
    spec = policy["spec"]
    assert policy["apiVersion"] == "gateway.envoyproxy.io/v1alpha1"
    assert spec["targetRefs"] == [{"group": "gateway.networking.k8s.io", "kind": "GRPCRoute", "name": route["metadata"]["name"]}]
    assert spec["loadBalancer"] == {"type": "LeastRequest"}
    active = spec["healthCheck"]["active"]
    assert (active["type"], active["http"]["path"], active["http"]["expectedStatuses"]) == ("HTTP", "/ready", [200])
    triton = container(objs)
    assert active["overrides"]["port"] == next(p["containerPort"] for p in triton["ports"] if p["name"] == "health") == PORTS["health"]
    args = triton["args"]
    assert args[args.index("--health-port") + 1] == str(PORTS["health"])
    assert spec["healthCheck"]["panicThreshold"] == 0
    assert set(spec["retry"]["retryOn"]["triggers"]) == {"connect-failure", "refused-stream", "reset-before-request"}
    assert spec["timeout"]["http"]["requestTimeout"] == "0s"
    assert int(spec["timeout"]["http"]["streamIdleTimeout"].removesuffix("s")) > 2 * 30
    assert spec["circuitBreaker"]["maxParallelRequests"] > 1024


def test_gateway_caps_grpc_messages_with_the_gateways_lua(rendered):
    """The EnvoyExtensionPolicy runs files/grpc-message-cap.lua (the file flowact gateway runs) on the route,
    with the cap in place of its placeholder."""
    objs = rendered["gateway"]
    policy = one(objs, "EnvoyExtensionPolicy")
    assert policy["spec"]["targetRefs"] == [{"group": "gateway.networking.k8s.io", "kind": "GRPCRoute",
                                             "name": one(objs, "GRPCRoute")["metadata"]["name"]}]
    (lua,) = policy["spec"]["lua"]
    source = (CHART / "files" / "grpc-message-cap.lua").read_text()
    assert lua["type"] == "Inline" and lua["inline"] == source.replace("MAX_BYTES", str(8 * 1024 * 1024))
