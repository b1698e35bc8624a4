"""Airflow: every night, summarize yesterday's partition of the lake on a running Ray cluster.

The job goes to the cluster through the Ray Jobs API (the dashboard, port 8265) with `RaySubmitJobOperator` from
the official Google provider (`pip install apache-airflow-providers-google`, 22.x, Airflow 2.11 or 3). Despite
its package it works with any Ray cluster reachable at a dashboard address: a KubeRay RayCluster
(infra/kuberay/raycluster.yaml), a cluster-launcher cluster or a Vertex AI one. There is no
apache-airflow-providers-ray release, and Astronomer's astro-provider-ray (`SubmitRayJob`) is deprecated and no
longer maintained.

Set the Airflow Variable `lakesum_ray_address` to the cluster's dashboard, e.g.
http://lakesum-head-svc.ray.svc.cluster.local:8265, and create the connection `lakesum_ray` of type
google_cloud_platform, empty: the operator's hook is a Google hook and looks its connection up even for a
cluster outside Google Cloud. Where the cluster requires Ray's token authentication, the Airflow workers need
RAY_AUTH_MODE=token and the token in RAY_AUTH_TOKEN. The job's code comes from the cluster's image
(infra/Dockerfile), so no runtime_env is sent.
"""
from __future__ import annotations

from datetime import datetime, timedelta

from airflow.providers.google.cloud.operators.ray import RaySubmitJobOperator
from airflow.timetables.interval import CronDataIntervalTimetable

try:  # Airflow 3
    from airflow.sdk import DAG, task
except ImportError:  # Airflow 2.11
    from airflow import DAG
    from airflow.decorators import task

RAY_ADDRESS = "{{ var.value.get('lakesum_ray_address', 'http://lakesum-head-svc:8265') }}"

# A data-interval timetable, so that `{{ ds }}` is the day the run covers, i.e. yesterday: the run for
# 2026-11-01 starts at 02:00 UTC on 2026-11-02. (Airflow 3's default for a cron string is a trigger timetable,
# where ds would be the run's own day.)
with DAG(
    dag_id="lakesum_nightly",
    schedule=CronDataIntervalTimetable("0 2 * * *", timezone="UTC"),
    start_date=datetime(2026, 11, 1),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 1, "retry_delay": timedelta(minutes=10)},
    tags=["lakesum"],
) as dag:
    # Every night writes under the same output root: --partition-filter picks the day's shards, and the
    # manifest keeps earlier nights' units. A retry (or a rerun from the UI) resumes the night's run, skipping
    # what was already committed.
    summarize = RaySubmitJobOperator(
        task_id="summarize",
        cluster_address=RAY_ADDRESS,
        entrypoint=(
            "python /home/ray/lakesum/jobs/summarize.py"
            " --model csebuetnlp/mT5_multilingual_XLSum"
            " --input s3://lake/news/"
            " --output s3://lake/news_summaries/"
            " --partition-filter date={{ ds }}"
            " --replicas 2"
        ),
        # Ray refuses a submission id it has seen: the try number makes each retry's id new.
        submission_id="lakesum-{{ ds_nodash }}-{{ ti.try_number }}",
        gcp_conn_id="lakesum_ray",
        wait_for_job_done=True,
        get_job_logs=False,  # the driver's log is in the Ray dashboard; it can be long
        submit_job_timeout=6 * 60 * 60,
        execution_timeout=timedelta(hours=7),
    )

    @task(retries=0)  # rerun by clearing `summarize`: it resumes
    def check_succeeded(job_id: str, address: str) -> None:
        """Fail the run unless the Ray job succeeded: RaySubmitJobOperator waits for the end but returns either way."""
        from ray.job_submission import JobStatus, JobSubmissionClient

        status = JobSubmissionClient(address).get_job_status(job_id)
        if status != JobStatus.SUCCEEDED:
            raise RuntimeError(f"Ray job {job_id} ended {status}; see its log in the Ray dashboard at {address}")

    check_succeeded(summarize.output, RAY_ADDRESS)
