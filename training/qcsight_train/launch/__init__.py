"""`qcsight train --sagemaker`: SageMaker training, tuning and Neo compilation jobs sent as plain API requests.

Every request is a dict in the shape of the SageMaker API, built here and sent with boto3, so
what `--dry-run` prints is exactly what is sent and botocore's service model can check it. The
SageMaker Python SDK is used for one public lookup only (the PyTorch training image's URI).

Module map:
    plan.py          what a launch is: frozen specs (AWS, compute, job, tuning), defaults, metric definitions
    cli.py           the command line: flags and examples, flags -> plan (errors name the flag), main()
    source.py        the reproducible source tarball the job unpacks (our code plus requirements.txt)
    job_requests.py  CreateTrainingJob and CreateHyperParameterTuningJob requests, job names
    neo.py           Neo's PyTorch version policy and the CreateCompilationJob request
    submit.py        upload the tarball, send the request, wait for the job (qcsight_aws does the AWS part)

In the job: training/sagemaker_node.py runs once per node (SM_* environment, requirements,
torchrun) and training/sagemaker_entry.py once per process. Only this package and those
scripts know about SageMaker jobs; the code that trains never imports sagemaker or boto3.
"""
