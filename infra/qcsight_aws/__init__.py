"""AWS helpers shared by every package that may use boto3: S3 URIs and transfers, error messages, job waiting.

Device code (qcsight_core, qcsight_edge) never imports this package; boto3 is imported inside
the functions that call AWS, so parsing an S3 URI costs no boto3 import.
"""
