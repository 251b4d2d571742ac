"""`qcsight gg`: build, validate, publish and deploy the Greengrass components, and run them on a local nucleus."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

from qcsight_core.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, configure_logging, parse_args
from qcsight_core.errors import QcsightError
from qcsight_gg.build import AGENT, DEFAULT_ARTIFACT_BASE, MODEL, DeviceTarget

log = logging.getLogger(__name__)

EPILOG = """\
A layout is the folder `build` writes: recipes/<name>-<version>.yaml and artifacts/<name>/<version>/.
Every command that reads recipes validates them first (format + the rules both nuclei need).

Examples:
  qcsight gg build --bundle runs/42/bundle --out build/gg --artifact-base s3://my-bucket/qcsight
  qcsight gg build --bundle runs/43/bundle --out build/gg --no-agent          a new model only
  qcsight gg validate build/gg
  qcsight gg publish --layout build/gg --dry-run
  qcsight gg deploy --target group:line-7 --model-version 1.1.0 --merge '{"source": {"uri": "rtsp://cam-7/live"}}'
  qcsight gg run-local --layout build/gg --root /tmp/gg --thing-name line-7-cam-2 \\
      --agent-version 0.1.0 --model-version 1.0.0 --endpoint 127.0.0.1 --port 8883 --cert c.pem --key k.pem --ca ca.pem
  qcsight gg run-local deploy --root /tmp/gg --model-version 1.1.0
  qcsight gg run-local status --root /tmp/gg

Exit codes: 0 done, 1 failed (a bad recipe, a refused request, a failed deployment), 2 usage error.
"""


def get_args_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    build = commands.add_parser("build", help="write the component layout (agent wheelhouse, model bundle)")
    build.add_argument("--out", type=Path, required=True, help="the layout folder (recipes/, artifacts/)")
    build.add_argument("--bundle", type=Path, help="a model bundle (folder or model.tar.gz): builds com.qcsight.Model")
    build.add_argument("--no-agent", action="store_true", help="do not build com.qcsight.EdgeAgent (model only)")
    build.add_argument("--artifact-base", default=DEFAULT_ARTIFACT_BASE,
                       help=f"the S3 prefix artifacts will be published under (default {DEFAULT_ARTIFACT_BASE}; "
                            "publish --artifact-base can change it; local runs ignore it)")
    here = DeviceTarget.this_machine()
    build.add_argument("--python-version", default=here.python_version,
                       help=f"the device's CPython MAJOR.MINOR (default this machine's, {here.python_version})")
    build.add_argument("--platform", action="append", dest="platforms", metavar="TAG",
                       help="a pip platform tag the device accepts; repeat, best first (default "
                            f"{' '.join(here.platforms)}; a Raspberry Pi 4 on 64-bit: manylinux_2_28_aarch64 "
                            "manylinux2014_aarch64)")
    build.add_argument("--wheels", type=Path, metavar="DIR",
                       help="take the dependency wheels from this folder only (no index): a previous wheelhouse "
                            "or a mirror, for offline or exactly repeated builds")
    build.add_argument("--agent-version", help="the agent component's version (default the qcsight version)")
    build.add_argument("--model-version", help="the model component's version (default from the bundle manifest)")
    build.add_argument("--source", type=Path, help="the qcsight source tree (default: found from here)")

    validate = commands.add_parser("validate", help="check recipes (and a layout's artifacts) before publishing")
    validate.add_argument("paths", type=Path, nargs="+", help="layout folders or recipe files")

    publish = commands.add_parser("publish", help="upload artifacts to S3 and create the component versions")
    publish.add_argument("--layout", type=Path, required=True)
    publish.add_argument("--component", action="append", metavar="NAME-VERSION",
                         help="publish only these (e.g. com.qcsight.Model-1.1.0); default every recipe of the layout")
    publish.add_argument("--artifact-base", help="publish the artifacts under this s3:// prefix (URIs rewritten)")
    publish.add_argument("--region", help="AWS region (default from the AWS configuration)")
    publish.add_argument("--dry-run", action="store_true", help="print the validated requests, send nothing")

    deploy = commands.add_parser("deploy", help="CreateDeployment to a thing or thing group")
    deploy.add_argument("--target", required=True, help="thing:NAME, group:NAME or an ARN")
    deploy.add_argument("--agent-version", help=f"{AGENT} version (default: keep the deployed one)")
    deploy.add_argument("--model-version", help=f"{MODEL} version (default: keep the deployed one)")
    deploy.add_argument("--merge", help="JSON (or @file) merged into the agent's configuration, checked by the "
                                        "agent's own rules first")
    deploy.add_argument("--layout", type=Path, help="where to read the agent recipe's defaults for that check "
                                                    "(default: GetComponent)")
    deploy.add_argument("--name", default="qcsight", help="the deployment's name")
    deploy.add_argument("--rate", type=int, default=5, help="devices per minute at first (default 5)")
    deploy.add_argument("--abort-percent", type=float, default=10.0,
                        help="cancel when this share of devices failed (default 10)")
    deploy.add_argument("--region")
    deploy.add_argument("--dry-run", action="store_true", help="print the validated request, send nothing")

    local = commands.add_parser("run-local", help="a local nucleus that installs, runs and deploys the components",
                                description="Run a local Greengrass nucleus (see qcsight_gg/nucleus.py) until "
                                            "SIGTERM/SIGINT; `deploy` and `status` talk to a running one.")
    _nucleus_args(local)
    actions = local.add_subparsers(dest="action", metavar="ACTION")
    local_deploy = actions.add_parser("deploy", help="deploy to a running local nucleus (as greengrass-cli does)")
    local_deploy.add_argument("--root", type=Path, required=True)
    local_deploy.add_argument("--layout", type=Path, help="take recipes and artifacts from here (default: the "
                                                          "nucleus's layout)")
    local_deploy.add_argument("--agent-version")
    local_deploy.add_argument("--model-version")
    local_deploy.add_argument("--merge", help="JSON (or @file) merged into the agent's configuration")
    local_deploy.add_argument("--no-rollback", action="store_true", help="failureHandlingPolicy DO_NOTHING")
    local_deploy.add_argument("--timeout", type=float, default=600.0, help="seconds to wait (default 600)")
    status = actions.add_parser("status", help="components, versions, states and the last deployments")
    status.add_argument("--root", type=Path, required=True)
    return parser


def _nucleus_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layout", type=Path, help="the component layout to install from")
    parser.add_argument("--root", type=Path, help="the nucleus root (packages/, work/, logs/, state.json)")
    parser.add_argument("--thing-name", help="the device's thing name")
    parser.add_argument("--flavor", choices=("classic", "lite"), default="classic",
                        help="behave like the Java nucleus (classic) or Greengrass nucleus lite")
    parser.add_argument("--agent-version", help=f"deploy {AGENT} at this version on start")
    parser.add_argument("--model-version", help=f"deploy {MODEL} at this version on start")
    parser.add_argument("--merge", help="JSON (or @file) merged into the agent's configuration")
    broker = parser.add_argument_group("the broker PublishToIoTCore goes to (mutual TLS)")
    broker.add_argument("--endpoint")
    broker.add_argument("--port", type=int, default=8883)
    broker.add_argument("--cert", type=Path)
    broker.add_argument("--key", type=Path)
    broker.add_argument("--ca", type=Path)


def main(argv: Sequence[str], prog: str = "qcsight gg") -> int:
    args = parse_args(get_args_parser(prog), argv)
    if isinstance(args, int):
        return args
    configure_logging(args.verbose)
    try:
        if args.command == "build":
            return _build(args)
        if args.command == "validate":
            return _validate(args)
        if args.command == "publish":
            return _publish(args)
        if args.command == "deploy":
            return _deploy(args)
        if args.action == "deploy":
            return _local_deploy(args)
        if args.action == "status":
            return _local_status(args)
        return _run_local(args, prog)
    except _Usage as exc:
        print(f"{prog} {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except QcsightError as exc:
        print(f"{prog} {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_FAILED


class _Usage(Exception):
    """A usage error argparse cannot see (options that must go together)."""


def _json_arg(text: str | None, what: str) -> dict[str, Any]:
    if not text:
        return {}
    try:
        raw = Path(text[1:]).read_text(encoding="utf-8") if text.startswith("@") else text
        value = json.loads(raw)
    except (OSError, ValueError) as exc:
        raise _Usage(f"{what} {text!r} is not JSON (or @file of JSON): {exc}") from exc
    if not isinstance(value, dict):
        raise _Usage(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


# -------------------------------------------------------------------- build, validate, publish, deploy


def _build(args: argparse.Namespace) -> int:
    from qcsight_gg.build import build_agent, build_model, check_layout, find_source

    if not args.artifact_base.startswith("s3://"):
        raise _Usage(f"--artifact-base must be an s3:// URI, got {args.artifact_base!r}")
    if args.no_agent and args.bundle is None:
        raise _Usage("nothing to build: --no-agent without --bundle")
    source = find_source(args.source)
    built = []
    if args.bundle is not None:
        built.append(build_model(args.bundle, args.out, source, args.artifact_base, args.model_version))
    if not args.no_agent:
        here = DeviceTarget.this_machine()
        target = DeviceTarget(args.python_version, tuple(args.platforms or here.platforms))
        built.append(build_agent(source, args.out, args.artifact_base, target, args.wheels, args.agent_version))
    check_layout(args.out)
    for item in built:
        print(item.describe())
    return EXIT_OK


def _validate(args: argparse.Namespace) -> int:
    from qcsight_gg.build import CONFIG_CHECKS
    from qcsight_gg.recipes import layout_recipes, load_recipe, validate

    problems: list[str] = []
    count = 0
    for path in args.paths:
        if path.is_dir():
            recipes = layout_recipes(path)
            problems += validate(recipes, path, CONFIG_CHECKS)
        else:
            recipes = [load_recipe(path)]
            problems += validate(recipes, None, CONFIG_CHECKS)
        count += len(recipes)
    for problem in problems:
        print(problem)
    print(f"{count} recipe(s), {len(problems)} problem(s)", file=sys.stderr)
    return EXIT_FAILED if problems or not count else EXIT_OK


def _publish(args: argparse.Namespace) -> int:
    from qcsight_gg.publish import plan, publish
    from qcsight_gg.recipes import layout_recipes

    recipes = layout_recipes(args.layout)
    if args.component:
        wanted = set(args.component)
        recipes = [r for r in recipes if r.ident in wanted]
        missing = wanted - {r.ident for r in recipes}
        if missing:
            raise _Usage(f"no recipe in {args.layout} for {', '.join(sorted(missing))}")
    if not recipes:
        raise _Usage(f"no recipes in {args.layout / 'recipes'}")
    publish_plan = plan(recipes, args.layout, args.artifact_base)
    if args.dry_run:
        print(publish_plan.describe())
        return EXIT_OK
    import boto3

    session = boto3.session.Session(region_name=args.region)
    arns = publish(publish_plan, session.client("s3"), session.client("greengrassv2"))
    for arn in arns:
        print(arn)
    return EXIT_OK


def _agent_defaults(layout: Path | None, version: str, greengrass: Any) -> dict[str, Any]:
    from qcsight_gg.recipes import load_recipe

    if layout is not None:
        for suffix in (".yaml", ".json"):
            path = layout / "recipes" / f"{AGENT}-{version}{suffix}"
            if path.is_file():
                data = load_recipe(path).data
                return dict((data.get("ComponentConfiguration") or {}).get("DefaultConfiguration") or {})
        raise _Usage(f"no {AGENT} {version} recipe in {layout / 'recipes'}")
    region = greengrass.meta.region_name
    arn = f"arn:aws:greengrass:{region}:{_account(greengrass)}:components:{AGENT}:versions:{version}"
    recipe = yaml.safe_load(greengrass.get_component(arn=arn, recipeOutputFormat="YAML")["recipe"])
    return dict((recipe.get("ComponentConfiguration") or {}).get("DefaultConfiguration") or {})


def _account(client: Any) -> str:
    import boto3

    return str(boto3.client("sts", region_name=client.meta.region_name).get_caller_identity()["Account"])


def _deploy(args: argparse.Namespace) -> int:
    from qcsight_gg.deploy import (
        DeploymentSpec,
        Rollout,
        check_agent_merge,
        create_deployment_request,
        current_components,
        resolve_components,
        resolve_target,
    )

    merge = _json_arg(args.merge, "--merge")
    import boto3

    session = boto3.session.Session(region_name=args.region)
    greengrass = session.client("greengrassv2")
    target = resolve_target(session.client("iot"), args.target)
    wanted = {AGENT: args.agent_version, MODEL: args.model_version}
    current = current_components(greengrass, target) if not all(wanted.values()) else {}
    components = resolve_components(wanted, current)
    if merge:
        check_agent_merge(_agent_defaults(args.layout, components[AGENT], greengrass), merge)
    spec = DeploymentSpec(target, components, {AGENT: merge} if merge else {}, rollout=Rollout(
        base_rate_per_minute=args.rate, abort_failure_percentage=args.abort_percent), name=args.name)
    request = create_deployment_request(spec)
    if args.dry_run:
        print(json.dumps(request, indent=2))
        return EXIT_OK
    response = greengrass.create_deployment(**request)
    print(json.dumps({k: response.get(k) for k in ("deploymentId", "iotJobId", "iotJobArn")}))
    return EXIT_OK


# -------------------------------------------------------------------- the local nucleus


def _run_local(args: argparse.Namespace, prog: str) -> int:
    from qcsight_gg.nucleus import LocalDeployment, LocalNucleus, NucleusConfig
    from qcsight_gg.relay import BrokerSettings

    for option in ("layout", "root", "thing_name"):
        if getattr(args, option) is None:
            raise _Usage(f"--{option.replace('_', '-')} is required to run a local nucleus")
    broker = None
    if args.endpoint:
        if not (args.cert and args.key and args.ca):
            raise _Usage("--endpoint needs --cert, --key and --ca (the broker takes client certificates)")
        broker = BrokerSettings(args.endpoint, args.port, args.cert, args.key, args.ca, args.thing_name)
    config = NucleusConfig(root=args.root.resolve(), store=args.layout.resolve(), thing_name=args.thing_name,
                           flavor=args.flavor, broker=broker)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("%s received: stopping the local nucleus", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with LocalNucleus(config) as nucleus:
        components = {name: version for name, version in ((AGENT, args.agent_version), (MODEL, args.model_version))
                      if version}
        if components:
            merge = _json_arg(args.merge, "--merge")
            result = nucleus.deploy(LocalDeployment(components, merges={AGENT: merge} if merge else {})).wait(3600)
            print(json.dumps(result.as_status(), indent=2))
            if not result.succeeded:
                return EXIT_FAILED
        print(f"{prog} run-local: nucleus on {config.root} ({config.flavor}); deploy with: {prog} run-local deploy "
              f"--root {config.root} --model-version X.Y.Z", file=sys.stderr)
        stop.wait()
    return EXIT_OK


def _local_deploy(args: argparse.Namespace) -> int:
    from qcsight_gg.nucleus import LocalDeployment, deploy_to_running

    components = {name: version for name, version in ((AGENT, args.agent_version), (MODEL, args.model_version))
                  if version}
    merge = _json_arg(args.merge, "--merge")
    if not components and not merge:
        raise _Usage("nothing to deploy: give --agent-version, --model-version or --merge")
    deployment = LocalDeployment(components, merges={AGENT: merge} if merge else {},
                                 failure_policy="DO_NOTHING" if args.no_rollback else "ROLLBACK",
                                 store=args.layout.resolve() if args.layout else None)
    result = deploy_to_running(args.root.resolve(), deployment, args.timeout)
    print(json.dumps(result.as_status(), indent=2))
    return EXIT_OK if result.succeeded else EXIT_FAILED


def _local_status(args: argparse.Namespace) -> int:
    try:
        state = json.loads((args.root / "state.json").read_text())
    except (OSError, ValueError) as exc:
        raise _Usage(f"no local nucleus state in {args.root}: {exc}") from exc
    for name, info in sorted(state.get("components", {}).items()):
        error = f"  last error: {info['last_error']}" if info.get("last_error") else ""
        print(f"{name:<24} {info['version']:<10} {info['state']:<9}{error}")
    for deployment in state.get("deployments", [])[-5:]:
        details = deployment.get("deploymentStatusDetails", {})
        cause = details.get("deploymentFailureCause", "")
        print(f"deployment {deployment['deploymentId']} {deployment['status']} "
              f"{details.get('detailedDeploymentStatus', '')} {cause}".rstrip())
    return EXIT_OK
