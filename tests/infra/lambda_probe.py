"""Run the Lambda handlers from a built function package, as Lambda would: run by tests/infra/test_packaging.py.

Started as ``python -I -S -B lambda_probe.py PACKAGE THIRD_PARTY RUNTIME WORK``: no site-packages, no
environment, no script folder on sys.path. The path is then the function package, the host-platform
copies of its third-party requirements (THIRD_PARTY: the package's own are built for the Lambda's CPU and
Python) and the Lambda runtime's boto3 and dependencies (RUNTIME), besides the standard library. Then:

1. each handler module is imported, and so is every module its functions import lazily;
2. the deploy function handles an approval (publish the model component with a recipe template read at run
   time, Neo, the canary deployment) and then a CanaryCheck tick that rolls the silent canary back, every
   AWS request answered by botocore's Stubber, which checks it against the service model;
3. every module loaded must come from those folders or the standard library.

Prints one JSON line: the modules loaded from the package and what the deploy function returned.
"""

from __future__ import annotations

import ast
import datetime
import importlib
import io
import json
import os
import sys
from pathlib import Path

HANDLERS = ("qcsight_cloud.lambda_ingest", "qcsight_cloud.lambda_policy", "qcsight_cloud.lambda_deploy")
MODEL = "com.qcsight.Model"
AGENT = "com.qcsight.EdgeAgent"
ACCOUNT = "123456789012"
CANARY = f"arn:aws:iot:us-east-1:{ACCOUNT}:thinggroup/line-1-canary"
FLEET = f"arn:aws:iot:us-east-1:{ACCOUNT}:thinggroup/line-1"


def lazy_imports(module: str) -> list[str]:
    """The modules a handler module's functions import (imports not at module level)."""
    tree = ast.parse(Path(importlib.import_module(module).__file__ or "").read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if id(node) in top:
            continue
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append(node.module)
    return found


def deploy(work: Path) -> dict[str, object]:
    import boto3
    from botocore.response import StreamingBody
    from botocore.stub import ANY, Stubber

    import qcsight_cloud.lambda_deploy as lambda_deploy

    def client(service: str) -> object:
        return boto3.client(service, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x",
                            endpoint_url=f"https://{service}.invalid")

    clients = lambda_deploy.Clients(client("s3"), client("greengrassv2"), client("sagemaker"), client("iot"))
    lambda_deploy._clients = lambda: clients  # type: ignore[attr-defined]
    os.environ.update({
        "QCSIGHT_STORE": f"sqlite:{work / 'store.sqlite'}", "QCSIGHT_COMPONENT_BUCKET": "artifacts",
        "QCSIGHT_COMPONENT_ARTIFACT_PREFIX": "components", "QCSIGHT_CANARY_THING_GROUP_ARN": CANARY,
        "QCSIGHT_FLEET_THING_GROUP_ARN": FLEET, "QCSIGHT_NEO_TARGET": "jetson_nano",
        "QCSIGHT_NEO_ROLE_ARN": f"arn:aws:iam::{ACCOUNT}:role/neo", "QCSIGHT_NEO_OUTPUT": "s3://models/neo/",
        "QCSIGHT_SOAK": json.dumps({"max_wait_s": 0.001}),  # a canary that reported nothing is rolled back
    })
    data = (work / "model.tar.gz").read_bytes()
    approved = {"version": "0", "source": "aws.sagemaker", "detail-type": lambda_deploy.DETAIL_TYPE, "detail": {
        "ModelPackageGroupName": "qcsight-line-1", "ModelPackageVersion": 3, "ModelApprovalStatus": "Approved",
        "ModelPackageArn": f"arn:aws:sagemaker:us-east-1:{ACCOUNT}:model-package/qcsight-line-1/3",
        "InferenceSpecification": {"Containers": [{"Image": "x", "ModelDataUrl": "s3://models/line-1/3/model.tar.gz"}]}}}
    tick = {"detail-type": "Scheduled Event", "source": "aws.events", "detail": {}}

    def deployment(gg: Stubber, target: str, previous: str, new: str) -> None:
        gg.add_response("list_deployments", {"deployments": [{"deploymentId": "d-0", "targetArn": target}]},
                        {"targetArn": target, "historyFilter": "LATEST_ONLY"})
        gg.add_response("get_deployment", {"deploymentId": "d-0", "components": {
            AGENT: {"componentVersion": "0.1.0"}, MODEL: {"componentVersion": previous}}}, {"deploymentId": "d-0"})
        gg.add_response("create_deployment", {"deploymentId": f"d-{new}"}, {
            "targetArn": target, "deploymentName": f"qcsight-model-{new}",
            "components": {AGENT: {"componentVersion": "0.1.0"}, MODEL: {"componentVersion": new}},
            "iotJobConfiguration": ANY, "deploymentPolicies": ANY, "clientToken": ANY})

    with Stubber(clients.s3) as s3, Stubber(clients.greengrass) as gg, Stubber(clients.sagemaker) as sm, \
            Stubber(clients.iot) as iot:
        s3.add_response("get_object", {"Body": StreamingBody(io.BytesIO(data), len(data))},
                        {"Bucket": "models", "Key": "line-1/3/model.tar.gz"})
        for name in ("bundle.zip", "offer_model.sh"):
            s3.add_response("put_object", {}, {"Bucket": "artifacts", "Key": f"components/{MODEL}/1.3.0/{name}",
                                               "Body": ANY, "ChecksumAlgorithm": "SHA256", "ChecksumSHA256": ANY,
                                               "ContentType": ANY})
        gg.add_response("create_component_version", {
            "arn": f"arn:aws:greengrass:us-east-1:{ACCOUNT}:components:{MODEL}:versions:1.3.0",
            "componentName": MODEL, "componentVersion": "1.3.0",
            "creationTimestamp": datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc),
            "status": {"componentState": "DEPLOYABLE", "message": "NONE", "errors": {}}},
            {"inlineRecipe": ANY, "clientToken": ANY})
        sm.add_response("create_compilation_job", {"CompilationJobArn": f"arn:aws:sagemaker:us-east-1:{ACCOUNT}:"
                                                   "compilation-job/x"}, {
            "CompilationJobName": ANY, "RoleArn": f"arn:aws:iam::{ACCOUNT}:role/neo", "InputConfig": ANY,
            "OutputConfig": {"S3OutputLocation": "s3://models/neo/", "TargetDevice": "jetson_nano"},
            "StoppingCondition": ANY})
        deployment(gg, CANARY, "1.2.0", "1.3.0")
        approval = lambda_deploy.handler(approved)
        for group, things in ((CANARY, ["canary-1"]), (FLEET, ["line-1-a", "canary-1"])):
            iot.add_response("list_things_in_thing_group", {"things": things},
                             {"thingGroupName": group.rpartition("/")[2], "recursive": group == FLEET,
                              "maxResults": 250})
        deployment(gg, CANARY, "1.3.0", "1.2.0")  # the rollback: the canary group back to 1.2.0
        check = lambda_deploy.handler(tick)
        for stub in (s3, gg, sm, iot):
            stub.assert_no_pending_responses()
    return {"approval": approval, "tick": check}


def main() -> None:
    # Not resolved: the test links THIRD_PARTY's and RUNTIME's entries to the build machine's installed copies.
    package, third_party, runtime, work = (Path(os.path.abspath(arg)) for arg in sys.argv[1:5])
    sys.path[:0] = [str(third_party), str(package), str(runtime)]
    os.chdir(package)  # Lambda's working directory is the package (/var/task): no checkout to fall back on
    importlib.import_module("qcsight_cloud.dynamodb_store")  # the store the functions open in AWS
    for module in HANDLERS:
        importlib.import_module(module)
        for name in lazy_imports(module):
            importlib.import_module(name)
    result = deploy(work)
    stdlib = Path(os.path.abspath(os.__file__)).parent
    allowed = (package, third_party, runtime, stdlib)
    outside = sorted(name for name, module in list(sys.modules.items())
                     if getattr(module, "__file__", None) and name not in ("__main__", "__mp_main__")
                     and not any(Path(os.path.abspath(module.__file__)).is_relative_to(root) for root in allowed))
    ours = sorted(name for name in sys.modules if name.startswith("qcsight_"))
    stray = [name for name in ours
             if not Path(os.path.abspath(sys.modules[name].__file__ or "")).is_relative_to(package)]
    print(json.dumps({"modules": ours, "outside": outside, "stray": stray, **result}, default=str))


if __name__ == "__main__":
    main()
