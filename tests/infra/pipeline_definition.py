"""A pipeline definition produced by code, standing in for qcsight_cloud's until it lands.

It has the shape of a real SageMaker pipeline definition (version, parameters, a training step)
and uses every input the stack hands over, so the tests can check what the stack passes in.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def definition(inputs: Mapping[str, str]) -> dict[str, Any]:
    return {
        "Version": "2020-12-01",
        "Parameters": [{"Name": "ModelPackageGroup", "Type": "String", "DefaultValue": inputs["model_package_group"]}],
        "Steps": [{
            "Name": "Train",
            "Type": "Training",
            "Arguments": {
                "RoleArn": inputs["role_arn"],
                "AlgorithmSpecification": {"TrainingImage": "pytorch-training", "TrainingInputMode": "File"},
                "InputDataConfig": [{"ChannelName": "train", "DataSource": {"S3DataSource": {
                    "S3DataType": "S3Prefix", "S3Uri": f"s3://{inputs['data_bucket']}/train/"}}}],
                "OutputDataConfig": {"S3OutputPath": f"s3://{inputs['pipeline_bucket']}/runs/",
                                     "KmsKeyId": inputs["kms_key_arn"]},
                "ResourceConfig": {"InstanceType": "ml.g5.xlarge", "InstanceCount": 1, "VolumeSizeInGB": 50},
                "StoppingCondition": {"MaxRuntimeInSeconds": 86400},
            },
        }],
    }
