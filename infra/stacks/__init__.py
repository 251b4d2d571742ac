"""The qcsight CDK app's stacks and the helpers they share (names, ARNs, IoT policies, packaging, cdk-nag)."""
