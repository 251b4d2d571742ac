"""What an engineer looks at and what pages them: the fleet dashboard and the alarms, mailed through the ops topic."""

from __future__ import annotations

from aws_cdk import Duration, Stack
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_cloudwatch_actions as actions
from aws_cdk import aws_elasticloadbalancingv2 as elbv2
from constructs import Construct

from stacks import names
from stacks.compute import ComputeStack
from stacks.config import AppConfig
from stacks.review import ReviewStack
from stacks.storage import StorageStack

PIPELINE_NAMESPACE = "AWS/Sagemaker/ModelBuildingPipeline"
_PERIOD = Duration.minutes(5)


class MonitoringStack(Stack):
    """A dashboard (defect rate, drift, silent devices, latency, pipeline runs, ingestion) and the alarms."""

    def __init__(self, scope: Construct, construct_id: str, *, config: AppConfig, storage: StorageStack,
                 compute: ComputeStack, review: ReviewStack | None, **kwargs: object) -> None:
        super().__init__(scope, construct_id, **kwargs)  # type: ignore[arg-type]
        self.config = config
        self.compute = compute
        self.action = actions.SnsAction(storage.ops_topic)
        self.alarms: list[cloudwatch.Alarm] = []
        self._function_alarms()
        self._queue_alarms()
        self._fleet_alarms()
        if review is not None:
            self._alarm("ReviewServerErrors", review.load_balancer.metrics.http_code_target(
                code=elbv2.HttpCodeTarget.TARGET_5XX_COUNT, period=_PERIOD, statistic="Sum"), 5,
                "the review app answered 5 or more server errors in 5 minutes")
        self.dashboard = self._dashboard()

    def _alarm(self, construct_id: str, metric: cloudwatch.IMetric, threshold: float, description: str) -> None:
        alarm = cloudwatch.Alarm(
            self, construct_id, metric=metric, threshold=threshold, evaluation_periods=1,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
            alarm_description=f"{self.config.fleet}: {description}",
        )
        alarm.add_alarm_action(self.action)
        self.alarms.append(alarm)

    def _function_alarms(self) -> None:
        for key, function in self.compute.functions.items():
            title = key.title()
            self._alarm(f"{title}Errors", function.metric_errors(period=_PERIOD), 1, f"the {key} function failed")
            self._alarm(f"{title}Throttles", function.metric_throttles(period=_PERIOD), 1,
                        f"the {key} function hit its reserved concurrency")

    def _queue_alarms(self) -> None:
        for name, queue in self.compute.dead_letter_queues.items():
            self._alarm(f"{name}Waiting", queue.metric_approximate_number_of_messages_visible(period=_PERIOD), 1,
                        f"messages are waiting in {name}: something failed and was kept for a replay")

    def _line_metric(self, name: str, line: str, statistic: str = "Average") -> cloudwatch.Metric:
        return cloudwatch.Metric(namespace=names.METRICS_NAMESPACE, metric_name=name,
                                 dimensions_map={names.METRIC_DIMENSION_LINE: line}, statistic=statistic,
                                 period=_PERIOD, label=line)

    def _pipeline_metric(self, name: str) -> cloudwatch.Metric:
        return cloudwatch.Metric(namespace=PIPELINE_NAMESPACE, metric_name=name,
                                 dimensions_map={"PipelineName": self.compute.pipeline_name}, statistic="Sum",
                                 period=Duration.hours(1), label=name)

    def _fleet_alarms(self) -> None:
        silent = cloudwatch.Metric(namespace=names.METRICS_NAMESPACE, metric_name=names.METRIC_SILENT_DEVICES,
                                   statistic="Maximum", period=_PERIOD)
        self._alarm("SilentDevices", silent, 1, "a device has been silent for 3 heartbeats")
        self._alarm("PipelineFailed", self._pipeline_metric("ExecutionFailed"), 1, "a retraining run failed")

    def _dashboard(self) -> cloudwatch.Dashboard:
        lines = self.config.lines
        dashboard = cloudwatch.Dashboard(self, "Dashboard", dashboard_name=self.config.name("fleet"))
        dashboard.add_widgets(
            cloudwatch.GraphWidget(title="Defect rate by line", width=12,
                                   left=[self._line_metric(names.METRIC_DEFECT_RATE, line) for line in lines]),
            cloudwatch.GraphWidget(title="Drift (PSI) by line: confidence, brightness", width=12,
                                   left=[self._line_metric(names.METRIC_CONFIDENCE_PSI, line) for line in lines],
                                   right=[self._line_metric(names.METRIC_BRIGHTNESS_PSI, line) for line in lines]),
        )
        dashboard.add_widgets(
            cloudwatch.SingleValueWidget(title="Silent devices", width=6, metrics=[cloudwatch.Metric(
                namespace=names.METRICS_NAMESPACE, metric_name=names.METRIC_SILENT_DEVICES, statistic="Maximum",
                period=_PERIOD)]),
            cloudwatch.GraphWidget(
                title="Latency p95 (ms) by line", width=6,
                left=[self._line_metric(names.METRIC_LATENCY_P95, line, "Maximum") for line in lines]),
            cloudwatch.GraphWidget(title="Retraining pipeline runs", width=12, left=[
                self._pipeline_metric(name) for name in ("ExecutionStarted", "ExecutionSucceeded", "ExecutionFailed")]),
        )
        ingest = self.compute.functions[names.INGEST.key]
        dashboard.add_widgets(
            cloudwatch.GraphWidget(title="Ingestion", width=12, left=[
                ingest.metric_invocations(period=_PERIOD), ingest.metric_errors(period=_PERIOD),
                ingest.metric_throttles(period=_PERIOD)]),
            cloudwatch.AlarmStatusWidget(title="Alarms", width=12, alarms=self.alarms),
        )
        return dashboard
