"""qcsight_edge: the device agent (camera -> verdict -> MQTT); never imports torch or boto3."""
