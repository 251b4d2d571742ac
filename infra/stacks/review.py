"""The operators' review app on ECS Fargate behind an HTTPS load balancer that signs every request in with Cognito.

The load balancer authenticates (Cognito user pool, MFA required, no self sign-up) before any
request reaches the container, then forwards the signed identity headers (x-amzn-oidc-data, a JWT
the app verifies against the ELB public key for its region, and x-amzn-oidc-identity). The app runs
in private subnets and accepts traffic only from the load balancer's security group.
"""

from __future__ import annotations

from aws_cdk import Annotations, CfnOutput, Duration, IgnoreMode, RemovalPolicy, Stack
from aws_cdk import aws_cognito as cognito
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_ecr_assets as ecr_assets
from aws_cdk import aws_ecs as ecs
from aws_cdk import aws_elasticloadbalancingv2 as elbv2
from aws_cdk import aws_elasticloadbalancingv2_actions as elb_actions
from aws_cdk import aws_iam as iam
from aws_cdk import aws_logs as logs
from constructs import Construct

from stacks import names, packaging
from stacks.arns import Arns
from stacks.compute import retention_days
from stacks.config import AppConfig
from stacks.nag import acknowledge, allow, kms_via
from stacks.storage import StorageStack
from stacks.tables import store_url

ROLES = ("operator", "engineer")  # Cognito groups; the app maps them to its roles


class ReviewStack(Stack):
    """VPC, Cognito user pool, ALB (HTTPS + Cognito authentication), Fargate service running the review image."""

    def __init__(self, scope: Construct, construct_id: str, *, config: AppConfig, storage: StorageStack,
                 **kwargs: object) -> None:
        super().__init__(scope, construct_id, **kwargs)  # type: ignore[arg-type]
        self.config = config
        self.storage = storage
        self.add_stack_dependency(storage)  # by name: tables and buckets are referred to by ARN, not export
        self.vpc = self._vpc()
        self.user_pool, self.client, self.domain = self._cognito()
        self.service, self.target_group = self._service()
        self.load_balancer = self._load_balancer()
        CfnOutput(self, "ReviewUrl", value=f"https://{config.review_domain_name}/",
                  description="point this name (CNAME/alias) at LoadBalancerDns")
        CfnOutput(self, "LoadBalancerDns", value=self.load_balancer.load_balancer_dns_name)
        CfnOutput(self, "UserPoolId", value=self.user_pool.user_pool_id,
                  description="add operators and engineers here (groups: operator, engineer)")

    @property
    def availability_zones(self) -> list[str]:
        """The configured zones: CDK would otherwise look them up with AWS credentials at synth time."""
        return list(self.config.zones)

    def _vpc(self) -> ec2.Vpc:
        flow_logs = logs.LogGroup(self, "FlowLogs", retention=retention_days(self.config.log_retention_days),
                                  removal_policy=RemovalPolicy.DESTROY)
        vpc = ec2.Vpc(
            self, "Vpc", availability_zones=list(self.config.zones),
            # One NAT gateway: the app fetches the ELB public keys that verify the identity header, and
            # Cognito's endpoints; two would only buy zone redundancy for that egress.
            nat_gateways=1,
            subnet_configuration=[
                ec2.SubnetConfiguration(name="public", subnet_type=ec2.SubnetType.PUBLIC, cidr_mask=24),
                ec2.SubnetConfiguration(name="app", subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS, cidr_mask=24),
            ],
            flow_logs={"all": ec2.FlowLogOptions(destination=ec2.FlowLogDestination.to_cloud_watch_logs(flow_logs),
                                                 traffic_type=ec2.FlowLogTrafficType.ALL)},
            restrict_default_security_group=True,
        )
        # S3 and DynamoDB traffic stays on AWS's network and off the NAT gateway.
        vpc.add_gateway_endpoint("S3", service=ec2.GatewayVpcEndpointAwsService.S3)
        vpc.add_gateway_endpoint("DynamoDb", service=ec2.GatewayVpcEndpointAwsService.DYNAMODB)
        return vpc

    def _cognito(self) -> tuple[cognito.UserPool, cognito.UserPoolClient, cognito.UserPoolDomain]:
        pool = cognito.UserPool(
            self, "Users", user_pool_name=self.config.name("review"), self_sign_up_enabled=False,
            sign_in_aliases=cognito.SignInAliases(email=True, username=True),
            mfa=cognito.Mfa.REQUIRED, mfa_second_factor=cognito.MfaSecondFactor(otp=True, sms=False),
            password_policy=cognito.PasswordPolicy(min_length=12, require_digits=True, require_lowercase=True,
                                                   require_uppercase=True, require_symbols=True,
                                                   temp_password_validity=Duration.days(3)),
            account_recovery=cognito.AccountRecovery.EMAIL_ONLY,
            feature_plan=cognito.FeaturePlan.PLUS,
            standard_threat_protection_mode=cognito.StandardThreatProtectionMode.FULL_FUNCTION,
            removal_policy=RemovalPolicy.RETAIN,
        )
        for role in ROLES:
            cognito.CfnUserPoolGroup(self, f"{role.title()}Group", user_pool_id=pool.user_pool_id, group_name=role,
                                     description=f"qcsight review role: {role}")
        client = pool.add_client(
            "AlbClient", generate_secret=True,
            o_auth=cognito.OAuthSettings(
                flows=cognito.OAuthFlows(authorization_code_grant=True),
                scopes=[cognito.OAuthScope.OPENID, cognito.OAuthScope.EMAIL, cognito.OAuthScope.PROFILE],
                callback_urls=[f"https://{self.config.review_domain_name}/oauth2/idpresponse"],
                logout_urls=[f"https://{self.config.review_domain_name}/"]),
            access_token_validity=Duration.hours(1), id_token_validity=Duration.hours(1),
            refresh_token_validity=Duration.hours(12), prevent_user_existence_errors=True,
        )
        domain = pool.add_domain("Domain", cognito_domain=cognito.CognitoDomainOptions(
            domain_prefix=self.config.cognito_domain_prefix))
        return pool, client, domain

    def _service(self) -> tuple[ecs.FargateService, elbv2.ApplicationTargetGroup]:
        missing = [path for path in packaging.REVIEW_CONTEXT if not (packaging.REPO_ROOT / path).exists()]
        if missing:
            Annotations.of(self).add_warning_v2(
                "qcsight:missing-review-sources",
                f"{', '.join(missing)} not in this tree: the review image cannot be built until they land")
        image = ecr_assets.DockerImageAsset(
            self, "ReviewImage", directory=str(packaging.REPO_ROOT), file="infra/docker/review.Dockerfile",
            exclude=packaging.docker_excludes(packaging.REVIEW_CONTEXT), ignore_mode=IgnoreMode.DOCKER,
            platform=ecr_assets.Platform.LINUX_AMD64,
        )
        cluster = ecs.Cluster(self, "Cluster", vpc=self.vpc, container_insights_v2=ecs.ContainerInsights.ENABLED)
        task = ecs.FargateTaskDefinition(self, "Task", cpu=512, memory_limit_mib=1024,
                                         task_role=self._task_role())
        log_group = logs.LogGroup(self, "AppLogs", retention=retention_days(self.config.log_retention_days),
                                  removal_policy=RemovalPolicy.DESTROY)
        c = self.config
        task.add_container(
            "app", image=ecs.ContainerImage.from_docker_image_asset(image),
            port_mappings=[ecs.PortMapping(container_port=names.REVIEW_PORT)],
            logging=ecs.LogDrivers.aws_logs(stream_prefix="review", log_group=log_group),
            environment={
                names.Env.STORE: store_url(c.fleet),
                names.Env.IMAGES_BUCKET: c.bucket_name("images"),
                names.Env.REVIEW_AUTH: "alb-oidc",
                names.Env.REVIEW_OIDC_ISSUER: self.user_pool.user_pool_provider_url,
                names.Env.REVIEW_REGION: self.region,
            },
        )
        # CDK's execution role pulls the image: ecr:GetAuthorizationToken takes no resource.
        acknowledge(task, "AwsSolutions-IAM5", "ecr:GetAuthorizationToken (added by CDK to the task's execution "
                    "role to pull the image) has no resource: AWS requires '*'", ["Resource::*"])
        acknowledge(task, "AwsSolutions-ECS2",
                    "The environment holds only resource names, the auth mode and the OIDC issuer URL: nothing "
                   "secret (the app has no secret of its own; identity comes signed from the load balancer).")
        app_sg = ec2.SecurityGroup(self, "AppSecurityGroup", vpc=self.vpc, allow_all_outbound=True,
                                   description="the review containers: reachable only from the load balancer")
        service = ecs.FargateService(
            self, "Service", cluster=cluster, task_definition=task, desired_count=1, assign_public_ip=False,
            security_groups=[app_sg], vpc_subnets=ec2.SubnetSelection(subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS),
            circuit_breaker=ecs.DeploymentCircuitBreaker(rollback=True), min_healthy_percent=100,
        )
        target_group = elbv2.ApplicationTargetGroup(
            self, "Targets", vpc=self.vpc, port=names.REVIEW_PORT, protocol=elbv2.ApplicationProtocol.HTTP,
            targets=[service], health_check=elbv2.HealthCheck(path=names.REVIEW_HEALTH_PATH, healthy_http_codes="200"),
            deregistration_delay=Duration.seconds(30),
        )
        self.app_security_group = app_sg
        return service, target_group

    def _task_role(self) -> iam.Role:
        arns = Arns(self.config)
        role = iam.Role(self, "TaskRole", assumed_by=iam.ServicePrincipal("ecs-tasks.amazonaws.com"),
                        description="the review app: read alerts and fleet data, append reviews, sign image URLs")
        keys = ("alerts", "devices", "metrics", "status", "decisions", "reviews", "runs", "counters")
        allow(role, "ReadAlertsAndFleet",
              ["dynamodb:Query", "dynamodb:GetItem", "dynamodb:BatchGetItem", "dynamodb:Scan"],
              [arns.table(key) for key in keys] + [arns.indexes(key) for key in keys],
              wildcard_reason="the tables' global secondary indexes: the inbox pages by line, class, device and "
                              "review state, reviews and decisions by month")
        # Reviews are append-only: PutItem (guarded by a condition in the app), never DeleteItem. The alert's
        # review summary (count, verdict, the sparse unreviewed index key) is updated in the same transaction.
        allow(role, "AppendReviews", ["dynamodb:PutItem"], [arns.table("reviews")])
        allow(role, "MarkAlertsReviewed", ["dynamodb:UpdateItem"], [arns.table("alerts")])
        allow(role, "SignImageUrls", ["s3:GetObject"], [arns.objects("images", f"{names.DEVICE_IMAGE_PREFIX}/*")],
              wildcard_reason="any device's alert image (devices/<thing>/<frame>), named at run time; a presigned "
                              "URL carries the signer's permission")
        kms_via(role, "KeyForTablesAndImages", self.storage.key.key_arn, ["kms:Decrypt", "kms:Encrypt",
                "kms:GenerateDataKey"], ["dynamodb", "s3"], self.region)
        return role

    def _load_balancer(self) -> elbv2.ApplicationLoadBalancer:
        c = self.config
        alb_sg = ec2.SecurityGroup(self, "LoadBalancerSecurityGroup", vpc=self.vpc, allow_all_outbound=False,
                                   description="the review load balancer: HTTPS from the configured networks")
        for cidr in c.review_ingress_cidrs:
            alb_sg.add_ingress_rule(ec2.Peer.ipv4(cidr), ec2.Port.tcp(443), "HTTPS from an allowed network")
            alb_sg.add_ingress_rule(ec2.Peer.ipv4(cidr), ec2.Port.tcp(80), "HTTP, redirected to HTTPS")
        # Cognito's token endpoint is called by the load balancer itself during sign-in.
        alb_sg.add_egress_rule(ec2.Peer.any_ipv4(), ec2.Port.tcp(443), "the Cognito token and userinfo endpoints")
        alb = elbv2.ApplicationLoadBalancer(
            self, "LoadBalancer", vpc=self.vpc, internet_facing=c.review_internet_facing, security_group=alb_sg,
            drop_invalid_header_fields=True,
            vpc_subnets=ec2.SubnetSelection(subnet_type=ec2.SubnetType.PUBLIC if c.review_internet_facing
                                            else ec2.SubnetType.PRIVATE_WITH_EGRESS),
        )
        alb.log_access_logs(self.storage.access_logs, prefix="review-alb")
        self.app_security_group.add_ingress_rule(alb_sg, ec2.Port.tcp(names.REVIEW_PORT), "from the load balancer")
        alb_sg.add_egress_rule(self.app_security_group, ec2.Port.tcp(names.REVIEW_PORT), "to the review containers")
        https = alb.add_listener(
            "Https", port=443, protocol=elbv2.ApplicationProtocol.HTTPS, open=False,
            certificates=[elbv2.ListenerCertificate.from_arn(c.review_certificate_arn)],
            ssl_policy=elbv2.SslPolicy.RECOMMENDED_TLS,
            default_action=elb_actions.AuthenticateCognitoAction(
                user_pool=self.user_pool, user_pool_client=self.client, user_pool_domain=self.domain,
                session_timeout=Duration.hours(8), next=elbv2.ListenerAction.forward([self.target_group])),
        )
        del https
        alb.add_listener("Http", port=80, open=False, default_action=elbv2.ListenerAction.redirect(
            protocol="HTTPS", port="443", permanent=True))
        return alb
