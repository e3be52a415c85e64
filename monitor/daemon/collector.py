"""Prometheus metrics, built from a snapshot of the daemon's state at each scrape."""

from __future__ import annotations

import platform
from typing import Any, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric

from monitor import __version__

# (metric, help, kind of record, value name) for run-level values, taken from the lowest rank reporting them.
RUN_VALUES = (
    ("trainguard_train_loss", "Latest training loss.", "train", "loss"),
    ("trainguard_grad_norm", "Latest global gradient norm (before clipping).", "train", "grad_norm"),
    ("trainguard_learning_rate", "Latest learning rate.", "train", "lr"),
    ("trainguard_eval_loss", "Latest evaluation loss.", "eval", "loss"),
)
# (metric, help, kind, value name) for per-rank values.
RANK_VALUES = (
    ("trainguard_step_duration_seconds", "Wall time of the rank's latest step.", "train", "step_time_seconds"),
    ("trainguard_compute_duration_seconds", "Forward and loss time of the rank's latest step, before collectives.",
     "train", "compute_time_seconds"),
    ("trainguard_data_wait_seconds", "Time the rank's latest step waited for its batch.", "train", "data_time_seconds"),
    ("trainguard_host_memory_rss_bytes", "Resident memory of the rank's process.", "system", "host_rss_bytes"),
    ("trainguard_gpu_memory_allocated_bytes", "GPU memory allocated by tensors.", "system",
     "gpu_memory_allocated_bytes"),
    ("trainguard_gpu_memory_reserved_bytes", "GPU memory reserved by the caching allocator.", "system",
     "gpu_memory_reserved_bytes"),
)
# Client counters from heartbeats: (value name, metric, help, is_counter).
CLIENT_VALUES = (
    ("client_queued_total", "trainguard_client_queued_records_total", "Records the client queued.", True),
    ("client_sent_total", "trainguard_client_sent_records_total", "Records the client delivered.", True),
    ("client_dropped_total", "trainguard_client_dropped_records_total",
     "Records the client dropped because its queue was full.", True),
    ("client_rejected_total", "trainguard_client_rejected_records_total",
     "Records the daemon refused from this client.", True),
    ("client_retries_total", "trainguard_client_retries_total", "Send attempts the client retried.", True),
    ("client_invalid_values_total", "trainguard_client_invalid_values_total",
     "Values the client could not read as numbers and dropped.", True),
    ("client_queue_depth", "trainguard_client_queue_depth", "Records waiting in the client's queue.", False),
    # Sent only by clients with a spill directory (spill_path).
    ("client_spilled_total", "trainguard_client_spilled_records_total",
     "Records the client wrote to its spill file while the daemon was away.", True),
    ("client_spill_bytes", "trainguard_client_spill_bytes", "Bytes in the client's spill file now.", False),
    ("client_spill_torn_total", "trainguard_client_spill_torn_batches_total",
     "Damaged batches the client found in a spill file and skipped (a crash mid-write).", True),
    ("client_spill_recovered_total", "trainguard_client_spill_recovered_records_total",
     "Records the client took over from the spill file of an earlier process.", True),
)
_SEVERITY_RANK = {"info": 1, "warning": 2, "critical": 3}


class DaemonCollector:
    """A prometheus_client custom collector over the daemon (no metric objects outlive a run)."""

    def __init__(self, daemon: Any):
        self.daemon = daemon

    def describe(self) -> list[Metric]:
        # Returning nothing keeps the registry from calling collect() at registration time.
        return []

    def collect(self) -> Iterator[Metric]:
        d = self.daemon
        silent_after = d.config.rank_silent_after
        run_fams = {name: GaugeMetricFamily(name, help_, labels=["run"]) for name, help_, _, _ in RUN_VALUES}
        rank_fams = {name: GaugeMetricFamily(name, help_, labels=["run", "rank"]) for name, help_, _, _ in RANK_VALUES}
        client_fams = {
            metric: (CounterMetricFamily(metric.removesuffix("_total"), help_, labels=["run", "rank"]) if counter
                     else GaugeMetricFamily(metric, help_, labels=["run", "rank"]))
            for _, metric, help_, counter in CLIENT_VALUES
        }
        step = GaugeMetricFamily("trainguard_step", "Largest optimizer step any rank finished.", labels=["run"])
        tps = GaugeMetricFamily("trainguard_tokens_per_second", "Training throughput over recent steps, all ranks.",
                                labels=["run"])
        seen = GaugeMetricFamily("trainguard_last_seen_timestamp_seconds", "Event time of the rank's latest record.",
                                 labels=["run", "rank"])
        info = GaugeMetricFamily("trainguard_run_info", "One per live run; labels describe it.",
                                 labels=["run", "status", "framework"])
        world = GaugeMetricFamily("trainguard_run_world_size", "Number of ranks in the job.", labels=["run"])
        reporting = GaugeMetricFamily("trainguard_run_ranks_reporting", "Ranks that reported recently.", labels=["run"])
        det_stat = GaugeMetricFamily("trainguard_detector_statistic", "Each detector's statistic for the run.",
                                     labels=["run", "detector"])
        straggler = GaugeMetricFamily("trainguard_straggler_score", "Each rank's pace against the fastest ranks' "
                                      "(StragglerRank: reference compute time / this rank's; 1 is as fast).",
                                      labels=["run", "rank"])
        probe_score = GaugeMetricFamily("trainguard_probe_score", "Latest value of each aggregate score of each "
                                        "probe series (suite as the record names it: S, S/gold_logprob, S/judge, "
                                        "drift).", labels=["run", "suite", "metric"])
        probe_delta = GaugeMetricFamily("trainguard_probe_baseline_delta", "Latest value of each probe score minus "
                                        "its value at the series' first probe in the run.",
                                        labels=["run", "suite", "metric"])
        probe_dropped = CounterMetricFamily("trainguard_probe_series_dropped", "Probe values not kept because the "
                                            "run already has the most probe series the daemon keeps.",
                                            labels=["run"])
        for st in d.registry.snapshot():
            with st.lock:
                run = st.run
                for name, _, kind, value in RUN_VALUES:
                    lead = st.lead_rank(kind)
                    v = lead.value(kind, value) if lead else None
                    if v is not None:
                        run_fams[name].add_metric([run], v)
                last = st.last_step()
                if last is not None:
                    step.add_metric([run], last)
                total_tps = None
                for r, rs in st.ranks.items():
                    rl = [run, str(r)]
                    seen.add_metric(rl, rs.last_t)
                    for name, _, kind, value in RANK_VALUES:
                        v = rs.value(kind, value)
                        if v is not None:
                            rank_fams[name].add_metric(rl, v)
                    for value, metric, _, _ in CLIENT_VALUES:
                        v = rs.client.get(value)
                        if v is not None:
                            client_fams[metric].add_metric(rl, v)
                    rt = rs.tokens_per_second()
                    if rt is not None:
                        total_tps = (total_tps or 0.0) + rt
                if total_tps is not None:
                    tps.add_metric([run], total_tps)
                for (suite, metric), (first, latest, _rank) in st.probe_series.items():
                    probe_score.add_metric([run, suite, metric], latest)
                    probe_delta.add_metric([run, suite, metric], latest - first)
                if st.probe_series_dropped:
                    probe_dropped.add_metric([run], st.probe_series_dropped)
                framework = str(st.meta.get("framework", ""))[:64] if isinstance(st.meta, dict) else ""
                info.add_metric([run, st.status, framework], 1)
                world.add_metric([run], st.effective_world_size)
                reporting.add_metric([run], st.ranks_reporting(silent_after))
                for det in st.detectors:
                    try:
                        v = det.statistic()
                        per_rank = det.scores() if hasattr(det, "scores") else {}
                    except Exception:  # noqa: BLE001 - one broken detector must not break the scrape
                        continue
                    if v is not None:
                        det_stat.add_metric([run, det.name], float(v))
                    for r, score in per_rank.items():
                        straggler.add_metric([run, str(r)], float(score))
        yield from run_fams.values()
        yield step
        yield tps
        yield from rank_fams.values()
        yield seen
        yield from client_fams.values()
        yield info
        yield world
        yield reporting
        yield det_stat
        yield straggler
        yield probe_score
        yield probe_delta
        yield probe_dropped

        active = GaugeMetricFamily("trainguard_alert_active", "1 while the alert fires.",
                                   labels=["run", "alert", "severity"])
        fired = CounterMetricFamily("trainguard_alerts_fired", "Times the alert started firing.",
                                    labels=["run", "alert"])
        for run, name, sev, is_active, count in d.alerts.known():
            active.add_metric([run, name, sev], 1 if is_active else 0)
            fired.add_metric([run, name], count)
        yield active
        yield fired

        # Network notifiers only: the log notifier writes synchronously and has nothing to lose.
        sent = CounterMetricFamily("trainguard_notifications", "Alert notifications by receiver and outcome: sent, "
                                   "failed (refused, or given up after retries) or dropped (queue full, shutdown).",
                                   labels=["notifier", "outcome"])
        retries = CounterMetricFamily("trainguard_notification_retries", "Delivery attempts that failed and were "
                                      "retried.", labels=["notifier"])
        depth = GaugeMetricFamily("trainguard_notifier_queue_depth", "Notifications waiting to be delivered.",
                                  labels=["notifier"])
        for n in getattr(d, "notifiers", ()):
            for outcome, v in (("sent", n.sent), ("failed", n.failed), ("dropped", n.dropped)):
                sent.add_metric([n.name, outcome], v)
            retries.add_metric([n.name], n.retries)
            depth.add_metric([n.name], n.queue_depth)
        yield sent
        yield retries
        yield depth
        silences = getattr(d, "silences", None)
        if silences is not None:
            g = GaugeMetricFamily("trainguard_silences_active", "Silences in force now.")
            g.add_metric([], silences.active_count())
            yield g

        ing = d.ingest.counters()
        c = CounterMetricFamily("trainguard_ingest_batches", "Batches applied (resends not counted).")
        c.add_metric([], ing["batches"])
        yield c
        c = CounterMetricFamily("trainguard_ingest_duplicate_batches", "Resent batches recognised and not applied.")
        c.add_metric([], ing["duplicates"])
        yield c
        c = CounterMetricFamily("trainguard_ingest_records", "Records applied, by kind.", labels=["kind"])
        for kind, n in sorted(ing["records_by_kind"].items()):
            c.add_metric([kind], n)
        yield c
        c = CounterMetricFamily("trainguard_ingest_rejected_records", "Records refused, by the field at fault.",
                                labels=["field"])
        for f, n in sorted(ing["rejected_records"].items()):
            c.add_metric([f], n)
        yield c
        c = CounterMetricFamily("trainguard_ingest_rejected_batches", "Whole batches refused, by the field at fault.",
                                labels=["field"])
        for f, n in sorted(ing["rejected_batches"].items()):
            c.add_metric([f], n)
        yield c
        c = CounterMetricFamily("trainguard_ingest_rejected_by_limit", "Refusals caused by a configured limit, by "
                                "its setting: one per record for per-record limits, one per batch for the others "
                                "(rate_limit_records_per_second and max_live_runs batches are sent again).",
                                labels=["limit"])
        for f, n in sorted(ing["rejected_by_limit"].items()):
            c.add_metric([f], n)
        yield c
        c = CounterMetricFamily("trainguard_ingest_errors", "Batches that failed inside the daemon (store errors).")
        c.add_metric([], ing["errors"])
        yield c
        c = CounterMetricFamily("trainguard_detector_errors", "Exceptions raised by detectors.", labels=["detector"])
        for det, n in sorted(ing["detector_errors"].items()):
            c.add_metric([det], n)
        yield c

        s = d.store.stats_now()
        for name, help_, v in (
            ("trainguard_store_batches_written", "Batches committed to SQLite.", s.batches_written),
            ("trainguard_store_records_written", "Records committed to SQLite.", s.records_written),
            ("trainguard_store_bytes_written", "Compressed batch bytes committed.", s.bytes_written),
            ("trainguard_store_commits", "SQLite transactions committed.", s.commits),
            ("trainguard_store_write_errors", "Failed SQLite transactions.", s.write_errors),
            ("trainguard_store_failed_batches", "Batches that could not be committed; their clients were told "
             "to send them again.", s.failed_batches),
            ("trainguard_store_dropped_writes", "Run summaries, alerts and silences that could not be stored and "
             "were given up.", s.dropped_writes),
            ("trainguard_store_commit_seconds", "Time spent in SQLite transactions, committed or failed (rate: the "
             "writer's busy fraction; over commits: the mean commit time).", s.commit_seconds),
        ):
            c = CounterMetricFamily(name, help_)
            c.add_metric([], v)
            yield c
        g = GaugeMetricFamily("trainguard_store_queue_depth", "Writes waiting for the store: queued, in the open "
                              "transaction, and kept to be written again after a failure.")
        g.add_metric([], s.queue_depth)
        yield g
        ok, _why = d.store.health()
        g = GaugeMetricFamily("trainguard_store_healthy", "1 while the store takes writes; 0 while its writer "
                              "fails, is stuck or has stopped (the daemon then acknowledges nothing new).")
        g.add_metric([], 1 if ok else 0)
        yield g
        http = getattr(d, "_http", None)
        if http is not None:
            c = CounterMetricFamily("trainguard_http_timeouts", "HTTP connections cut off because their request "
                                    "did not arrive within http_timeout_seconds.")
            c.add_metric([], http.timeouts)
            yield c
        auth = getattr(d, "auth", None)
        if auth is not None:
            c = CounterMetricFamily("trainguard_auth_refused", "Requests refused by authentication or a token's "
                                    "scope, by listener (grpc, http) and reason: missing_token, unknown_token, "
                                    "malformed, read_only, run_scope, tls_handshake (HTTP only).",
                                    labels=["listener", "reason"])
            for (listener, reason), n in sorted(auth.refusals().items()):
                c.add_metric([listener, reason], n)
            yield c
        g = GaugeMetricFamily("trainguard_runs", "Live runs.")
        g.add_metric([], len(d.registry.runs))
        yield g
        c = CounterMetricFamily("trainguard_runs_expired", "Runs forgotten after they finished or fell silent.")
        c.add_metric([], d.runs_expired)
        yield c
        bi = InfoMetricFamily("trainguard_build", "trainguard version and runtime.")
        bi.add_metric([], {"version": __version__, "python": platform.python_version()})
        yield bi
