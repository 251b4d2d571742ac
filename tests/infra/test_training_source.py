"""The pipeline's training code reaches S3 on deploy: the checkout's sourcedir.tar.gz, reproducible, by a lean role."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stacks.training_source import TrainingSource, stage_training_source

from qcsight_aws.jobs import SOURCE_TARBALL
from qcsight_train.launch.source import package_source
from tests.infra.cfn import ACCOUNT, REGION, as_list, resolve, resources
from tests.infra.conftest import FLEET, REPO, Assembly

Templates = Mapping[str, dict[str, Any]]
PIPELINE_BUCKET = f"qcsight-pipeline-{ACCOUNT}-{REGION}"


def _asset(assembly: Assembly) -> tuple[Path, str]:
    """The staged folder of the training source asset and the S3 key CDK publishes its zip under."""
    folder = assembly.asset_dir("compute", "files", SOURCE_TARBALL)
    manifest = json.loads((assembly.outdir / f"{FLEET}-compute.assets.json").read_text())
    (entry,) = [entry for entry in manifest["files"].values() if entry["source"]["path"] == folder.name]
    (destination,) = entry["destinations"].values()
    return folder, destination["objectKey"]


def _deployment(templates: Templates) -> dict[str, Any]:
    (deployment,) = [(stack, props) for stack, _, props in resources(templates, "Custom::CDKBucketDeployment")]
    assert deployment[0] == "compute"
    return dict(resolve(deployment[1]))


def test_deploy_copies_the_asset_to_the_code_prefix_the_pipeline_trains_from(assembly: Assembly,
                                                                             templates: Templates) -> None:
    from qcsight_cloud import pipeline as qp

    deployment = _deployment(templates)
    _, object_key = _asset(assembly)
    assert deployment["SourceObjectKeys"] == [object_key]
    assert (deployment["DestinationBucketName"], deployment["DestinationBucketKeyPrefix"]) == (PIPELINE_BUCKET,
                                                                                               "source/")
    # Nothing else under the prefix is deleted, and deleting the stack leaves the code in the retained bucket.
    assert (deployment["Prune"], deployment["Extract"], deployment["RetainOnDelete"]) == (False, True, True)
    (_, _, pipeline), = resources(templates, "AWS::SageMaker::Pipeline")
    body = json.loads(resolve(pipeline["PipelineDefinition"]["PipelineDefinitionBody"]))
    train = next(step for step in body["Steps"] if step["Name"] == qp.TRAIN)["Arguments"]
    code = next(c for c in train["InputDataConfig"] if c["ChannelName"] == "code")
    assert code["DataSource"]["S3DataSource"]["S3Uri"] == f"s3://{PIPELINE_BUCKET}/source/"
    assert templates["compute"]["Outputs"]["TrainingSourceUri"]["Value"] == \
        f"s3://{PIPELINE_BUCKET}/source/{SOURCE_TARBALL}"


def test_the_asset_is_the_checkouts_source_tarball_alone(assembly: Assembly, tmp_path: Path) -> None:
    folder, _ = _asset(assembly)
    assert sorted(path.name for path in folder.iterdir()) == [SOURCE_TARBALL]
    # What `qcsight train launch` would pack from this checkout now, byte for byte.
    packed = package_source(REPO, tmp_path)
    assert hashlib.sha256((folder / SOURCE_TARBALL).read_bytes()).hexdigest() == packed.sha256


def test_staging_empties_the_folder_first(tmp_path: Path) -> None:
    out = tmp_path / "training-source"
    out.mkdir()
    (out / "stale.txt").write_text("left by an earlier synth")
    package = stage_training_source(out)
    assert sorted(path.name for path in out.iterdir()) == [SOURCE_TARBALL] and package.tarball == out / SOURCE_TARBALL


def test_two_synths_of_the_same_code_give_the_same_asset(assembly: Assembly, tmp_path: Path) -> None:
    import aws_cdk as cdk
    from aws_cdk import aws_logs as logs

    _, object_key = _asset(assembly)
    hashes = []
    for name in ("first", "second"):
        app = cdk.App(outdir=str(tmp_path / name))
        stack = cdk.Stack(app, "Probe", env=cdk.Environment(account=ACCOUNT, region=REGION))
        source = TrainingSource(stack, "TrainingSource", bucket_name=PIPELINE_BUCKET, prefix="source/",
                                key_arn=f"arn:aws:kms:{REGION}:{ACCOUNT}:key/probe",
                                log_retention=logs.RetentionDays.ONE_DAY)
        app.synth()
        hashes.append(source.asset.asset_hash)
    # Both, and the app's own synth (another process, another output folder), name the same asset.
    assert hashes[0] == hashes[1] and object_key == f"{hashes[0]}.zip"


def _role_statements(templates: Templates, role_logical_id: str) -> list[dict[str, Any]]:
    statements = []
    for _, _, props in resources({"compute": templates["compute"]}, "AWS::IAM::Policy"):
        if f"<Ref:{role_logical_id}>" in resolve(props["Roles"]):
            statements += resolve(props["PolicyDocument"]["Statement"])
    return statements


def test_the_copy_may_read_its_asset_write_the_tarball_and_use_the_storage_key(assembly: Assembly,
                                                                               templates: Templates) -> None:
    (handler,) = [props for stack, logical_id, props in resources(templates, "AWS::Lambda::Function")
                  if logical_id.startswith("CustomCDKBucketDeployment")]
    role_id = handler["Role"]["Fn::GetAtt"][0]
    role = templates["compute"]["Resources"][role_id]["Properties"]
    assert "ManagedPolicyArns" not in role and "Policies" not in role  # no AWSLambdaBasicExecutionRole
    logs_id = handler["LoggingConfig"]["LogGroup"]["Ref"]
    assert templates["compute"]["Resources"][logs_id]["Properties"]["RetentionInDays"] == 90

    granted: dict[str, set[str]] = {}
    for statement in _role_statements(templates, role_id):
        for action in as_list(statement["Action"]):
            granted.setdefault(action, set()).update(as_list(statement["Resource"]))
        if statement["Action"] == "s3:ListBucket":
            assert statement["Condition"] == {"StringLike": {"s3:prefix": "source/*"}}
        if statement["Sid"] == "BucketKey":
            assert statement["Condition"] == {"StringEquals": {"kms:ViaService": f"s3.{REGION}.amazonaws.com"}}
    _, object_key = _asset(assembly)
    (key,) = granted["kms:Decrypt"]
    assert granted == {
        "logs:CreateLogStream": {f"<GetAtt:{logs_id}.Arn>"}, "logs:PutLogEvents": {f"<GetAtt:{logs_id}.Arn>"},
        "s3:GetObject": {f"arn:aws:s3:::cdk-hnb659fds-assets-{ACCOUNT}-{REGION}/{object_key}"},
        "s3:ListBucket": {f"arn:aws:s3:::{PIPELINE_BUCKET}"},
        "s3:PutObject": {f"arn:aws:s3:::{PIPELINE_BUCKET}/source/{SOURCE_TARBALL}"},
        "kms:Decrypt": {key}, "kms:GenerateDataKey": {key},  # S3 encrypts with a data key, decrypts parts with it
    }
    # The key is the one the storage stack encrypts the pipeline bucket with.
    (bucket,) = [props for _, _, props in resources({"storage": templates["storage"]}, "AWS::S3::Bucket")
                 if props["BucketName"] == PIPELINE_BUCKET]
    encryption = bucket["BucketEncryption"]["ServerSideEncryptionConfiguration"][0]["ServerSideEncryptionByDefault"]
    key_logical_id = encryption["KMSMasterKeyID"]["Fn::GetAtt"][0]
    assert key.startswith(f"<Import:{FLEET}-storage:") and f"FnGetAtt{key_logical_id}Arn" in key, key

