"""The registry (states, append-only history), the soak decision's table, and a rollout promoting or rolling back."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import pytest

from qcsight_cloud.errors import CloudError
from qcsight_cloud.ingest import Ingestor
from qcsight_cloud.registry import (
    APPROVED,
    CANARY,
    PENDING,
    PROMOTED,
    REJECTED,
    ROLLED_BACK,
    ModelVersion,
    Registry,
    RegistryError,
)
from qcsight_cloud.rollout import (
    PROMOTE,
    ROLLBACK,
    WAIT,
    DeployError,
    GroupStats,
    Rollout,
    RolloutSettings,
    SoakSettings,
    soak_decision,
)
from qcsight_cloud.sqlite_store import SqliteStore
from tests.cloud.builders import T0, incoming, metrics
from tests.cloud.test_gate import report
from tests.helpers.models import make_tiny_bundle


def bundle(tmp_path: Path, version: str) -> Path:
    folder = tmp_path / f"bundle-{version}"
    make_tiny_bundle(folder, version=version)  # a real bundle: the rollout reads its manifest's version
    return folder


def evaluation(tmp_path: Path, name: str, **kwargs: object) -> Path:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(report(**kwargs)))  # type: ignore[arg-type]
    return path


# ---------------------------------------------------------------- registry


def test_registry_states_are_final_and_the_history_only_grows(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "reg")
    first = registry.adopt(bundle(tmp_path, "1"), evaluation(tmp_path, "e1"), scope="line-1", by="lead")
    assert (first.version, first.status, first.deployment) == ("1", APPROVED, PROMOTED)
    assert registry.production("line-1") == first and registry.production("line-2") is None
    passed = {"passed": True, "reasons": ["ok"], "candidate": {"macro_f1": 0.9}}
    second = registry.register(bundle(tmp_path, "2"), evaluation(tmp_path, "e2"), passed, scope="line-1", run_id="r2")
    assert (second.version, second.status, second.deployment) == ("2", PENDING, None)
    assert (second.bundle / "model.onnx").read_bytes() == (tmp_path / "bundle-2" / "model.onnx").read_bytes()
    assert json.loads((second.path / "gate.json").read_text())["passed"] is True
    refused = registry.register(bundle(tmp_path, "3"), evaluation(tmp_path, "e3"), {"passed": False}, scope="line-1")
    with pytest.raises(RegistryError, match="failed the gate"):
        registry.decide(refused.version, APPROVED, "op")
    registry.decide(refused.version, REJECTED, "op", "worse")
    with pytest.raises(RegistryError, match="already Rejected; a decision is final"):
        registry.decide(refused.version, APPROVED, "op")
    with pytest.raises(RegistryError, match="Rejected, not Approved"):
        registry.record(refused.version, CANARY)
    with pytest.raises(RegistryError, match=r"no model version '9'.*versions: \['1', '2', '3'\]"):
        registry.get("9")
    with pytest.raises(RegistryError, match="must be a new positive integer"):
        registry.register(bundle(tmp_path, "x"), evaluation(tmp_path, "ex"), passed, scope="line-1", version="2")
    before = (registry.root / "history.jsonl").read_text()
    registry.decide("2", APPROVED, "op")
    after = (registry.root / "history.jsonl").read_text()
    assert after.startswith(before) and len(after.splitlines()) == len(before.splitlines()) + 1
    # a new Registry on the same folder (a restarted process) sees the same states; a torn last line is ignored
    with (registry.root / "history.jsonl").open("a") as handle:
        handle.write('{"event": "Appro')
    again = Registry(registry.root)
    assert [(v.version, v.status) for v in again.versions()] == [("1", APPROVED), ("2", APPROVED), ("3", REJECTED)]


# ---------------------------------------------------------------- the soak decision

SOAK = SoakSettings(soak_s=300, min_windows=3, min_frames=300, max_wait_s=1800, rate_alpha=0.01,
                    max_latency_ratio=1.5)
CANARY_OK = GroupStats(windows=5, frames=500, defect=10, errors=0, latency_p95_ms=8.0)
FLEET = GroupStats(windows=10, frames=1000, defect=20, errors=0, latency_p95_ms=7.5)

SOAK_CASES = [
    # (name, canary, fleet, elapsed_s, action, a reason that must be there)
    ("clean after the soak", CANARY_OK, FLEET, 400, PROMOTE, "5 canary windows (500 frames)"),
    ("clean but too early", CANARY_OK, FLEET, 200, WAIT,
     "5 canary windows (500 frames) under the new model over 200 s"),
    ("too few windows yet", GroupStats(2, 500, 10, 0, 8.0), FLEET, 400, WAIT, "2 canary windows"),
    ("too few frames yet", GroupStats(5, 100, 2, 0, 8.0), FLEET, 400, WAIT, "5 canary windows (100 frames)"),
    ("a silent canary past the limit", GroupStats(), FLEET, 1900, ROLLBACK, "no evidence from the canary after 1900 s"),
    ("defect rate regression shows before the soak ends", GroupStats(3, 500, 60, 0, 8.0), FLEET, 60, ROLLBACK,
     "canary defect rate significantly above the fleet's"),
    ("a lower defect rate is no regression", GroupStats(5, 500, 0, 0, 8.0), FLEET, 400, PROMOTE, "5 canary windows"),
    ("frame errors", GroupStats(5, 500, 10, 3, 8.0), FLEET, 400, ROLLBACK, "canary reported 3 frame errors"),
    ("slower than the fleet", GroupStats(5, 500, 10, 0, 12.0), FLEET, 400, ROLLBACK, "canary slower than the fleet"),
    ("no fleet to compare with", CANARY_OK, GroupStats(), 400, PROMOTE, "5 canary windows"),
]


@pytest.mark.parametrize("name, canary, fleet, elapsed, action, reason", SOAK_CASES, ids=[c[0] for c in SOAK_CASES])
def test_soak_table(name: str, canary: GroupStats, fleet: GroupStats, elapsed: float, action: str,
                    reason: str) -> None:
    decision = soak_decision(SOAK, canary, fleet, elapsed)
    assert decision.action == action, decision.reasons
    assert any(reason in r for r in decision.reasons), decision.reasons


def test_rate_alpha_zero_turns_the_rate_check_off_where_a_tiny_alpha_cannot() -> None:
    # Every frame a defect on the canary, none on the fleet: the score test's p-value underflows to 0.
    lopsided = GroupStats(windows=5, frames=500, defect=500, errors=0, latency_p95_ms=8.0)
    clean_fleet = GroupStats(windows=10, frames=1000, defect=0, errors=0, latency_p95_ms=7.5)
    tiny = SoakSettings(soak_s=300, min_windows=3, min_frames=300, rate_alpha=1e-300)
    assert soak_decision(tiny, lopsided, clean_fleet, 400).action == ROLLBACK
    off = SoakSettings(soak_s=300, min_windows=3, min_frames=300, rate_alpha=0)
    decision = soak_decision(off, lopsided, clean_fleet, 400)
    assert decision.action == PROMOTE, decision.reasons
    assert any("not checked" in check.summary for check in decision.checks), decision.checks
    # ... and the other checks still hold with it off.
    slow = GroupStats(windows=5, frames=500, defect=500, errors=0, latency_p95_ms=30.0)
    assert soak_decision(off, slow, clean_fleet, 400).action == ROLLBACK
    with pytest.raises(CloudError, match="rate_alpha"):
        SoakSettings(rate_alpha=1.0)


# ---------------------------------------------------------------- the rollout


class RecordingDeployer:
    """Stands in for the nuclei: records what was published and deployed where; can refuse a version."""

    def __init__(self, refuse: str | None = None) -> None:
        self.published: list[str] = []
        self.deployed: list[tuple[tuple[str, ...], str]] = []
        self.refuse = refuse

    def publish(self, model: ModelVersion) -> str:
        assert (model.bundle / "manifest.json").is_file()
        self.published.append(model.component_version)
        return model.component_version

    def deploy(self, things: Sequence[str], component_version: str) -> None:
        if component_version == self.refuse:
            raise DeployError(f"{things[0]}: FAILED_ROLLBACK_COMPLETE")
        self.deployed.append((tuple(things), component_version))


LINE = {"line-1": ("cam-1", "cam-2", "cam-3")}


def windows(store: SqliteStore, thing: str, model: str, start_seq: int, count: int, defects: int,
            minutes_after: int) -> None:
    ingestor = Ingestor(store, lambda thing: "line-1")
    ingestor.ingest_batch([incoming(metrics(thing, start_seq + i, T0 + timedelta(minutes=minutes_after + i),
                                            frames=100, defects=defects, model=model)) for i in range(count)])


@pytest.mark.parametrize("canary_defects, outcome", [(2, PROMOTED), (30, ROLLED_BACK)])
def test_canary_promotes_when_clean_and_rolls_back_on_a_regression(tmp_path: Path, canary_defects: int,
                                                                   outcome: str) -> None:
    registry = Registry(tmp_path / "reg")
    registry.adopt(bundle(tmp_path, "1"), evaluation(tmp_path, "e1"), scope="line-1", by="lead")
    model = registry.register(bundle(tmp_path, "2"), evaluation(tmp_path, "e2"), {"passed": True}, scope="line-1")
    store = SqliteStore(tmp_path / "s.sqlite")
    deployer = RecordingDeployer()
    rollout = Rollout(registry, store, deployer, RolloutSettings({"line-1": ("cam-1",)}, SOAK), LINE)
    assert rollout.step(T0) == []  # pending approval: nothing moves
    registry.decide(model.version, APPROVED, "op")
    rollout.step(T0)
    assert deployer.published == ["1.2.0"] and deployer.deployed == [(("cam-1",), "1.2.0")]
    assert registry.get("2").deployment == CANARY
    started = registry.get("2").events[-1]["at"]
    # the canary under version 2 and the fleet under version 1, after the canary started
    from qcsight_cloud import timestamps

    base = int((timestamps.parse(started) - T0).total_seconds() // 60) + 1
    windows(store, "cam-1", "2", 1, 5, canary_defects, base)
    windows(store, "cam-2", "1", 1, 5, 2, base)
    windows(store, "cam-3", "1", 1, 5, 2, base)
    now = timestamps.parse(started) + timedelta(minutes=10)
    # a restarted process (new Rollout, same registry and store) carries the soak on
    rollout = Rollout(Registry(registry.root), store, deployer, RolloutSettings({"line-1": ("cam-1",)}, SOAK), LINE)
    (decided,) = rollout.step(now)
    assert registry.get("2").deployment == outcome
    if outcome == PROMOTED:
        assert decided[1].action == PROMOTE
        assert deployer.deployed[-1] == (("cam-2", "cam-3"), "1.2.0")
        assert registry.production("line-1").version == "2"  # type: ignore[union-attr]
    else:
        assert decided[1].action == ROLLBACK
        assert deployer.deployed[-1] == (("cam-1",), "1.1.0")  # the previous version back on the canary
        assert registry.production("line-1").version == "1"  # type: ignore[union-attr]
        assert "significantly above the fleet's" in registry.get("2").events[-1]["reason"]
    (recorded,) = store.decisions("rollout:line-1")
    assert recorded.action == decided[1].action
    assert rollout.step(now + timedelta(minutes=1)) == []  # done: nothing more to do


def test_a_failed_canary_deployment_rolls_back_at_once(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "reg")
    registry.adopt(bundle(tmp_path, "1"), evaluation(tmp_path, "e1"), scope="line-1", by="lead")
    registry.register(bundle(tmp_path, "2"), evaluation(tmp_path, "e2"), {"passed": True}, scope="line-1")
    registry.decide("2", APPROVED, "op")
    store = SqliteStore(tmp_path / "s.sqlite")
    deployer = RecordingDeployer(refuse="1.2.0")
    Rollout(registry, store, deployer, RolloutSettings({}, SOAK), LINE).step(T0)
    assert registry.get("2").deployment == ROLLED_BACK
    assert "the canary deployment failed: cam-1: FAILED_ROLLBACK_COMPLETE" in registry.get("2").events[-1]["reason"]
    assert deployer.deployed == [(("cam-1",), "1.1.0")]


def test_models_cli_lists_approves_and_refuses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from qcsight_cloud.cli import main

    registry = Registry(tmp_path / "reg")
    registry.adopt(bundle(tmp_path, "1"), evaluation(tmp_path, "e1"), scope="line-1", by="lead")
    registry.register(bundle(tmp_path, "2"), evaluation(tmp_path, "e2"), {"passed": True, "candidate": {
        "macro_f1": 0.93}}, scope="line-1")
    root = str(registry.root)
    assert main(["models", "--registry", root, "approve", "2", "--by", "lead", "--reason", "looks right"]) == 0
    assert "model version 2: Approved" in capsys.readouterr().out
    assert main(["models", "--registry", root, "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(v["version"], v["status"], v["deployment"]) for v in listed] == [("1", APPROVED, PROMOTED),
                                                                              ("2", APPROVED, None)]
    assert listed[1]["metrics"]["macro_f1"] == 0.93
    with pytest.raises(RegistryError, match="already Approved"):
        main(["models", "--registry", root, "reject", "2"])
