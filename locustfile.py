"""Load scenarios for Locust: `locust -f locustfile.py --host http://localhost:3000` (web UI), or headless with
reports, e.g. `locust -f locustfile.py --host http://localhost:3000 --headless -u 64 -r 16 -t 1m
--csv reports/baseline --html reports/baseline.html BaselineUser`.

User classes (pick one or more on the command line; tags `baseline`, `cache`, `batch`, `stress` select the same;
each scenario's requests are reported under their own name, e.g. `/v1/query-classify [cache]`):
- BaselineUser: steady load of mostly unique real queries (cold cache).
- CacheUser: a small hot set of 50 queries (high hit rate after the first round).
- BatchUser: bursts of concurrent requests with pauses, to form large batches.
- StressUser: no think time; ramp it past saturation, e.g. `-u 400 -r 5 -t 3m StressUser`.
Queries come from bench.queries: real dolly records (../shared/data, or the test fixture) plus random variation.
"""

from __future__ import annotations

import random

from gevent.pool import Group
from locust import HttpUser, between, constant, events, tag, task
from locust.env import Environment

from bench.queries import QueryGenerator

GENERATOR = QueryGenerator(seed=random.randrange(2**32))
HOT_SET = GENERATOR.hot_set(50)


@events.test_start.add_listener
def drop_users_without_tasks(environment: Environment, **_: object) -> None:
    """`--tags` filters tasks, not user classes: a class left with none would fail on every spawn (locust 2.47)."""
    environment.user_classes[:] = [user for user in environment.user_classes if user.tasks]


def classify(user: HttpUser, text: str, scenario: str) -> None:
    with user.client.post(
        "/v1/query-classify", json={"text": text}, name=f"/v1/query-classify [{scenario}]", catch_response=True
    ) as r:
        if r.status_code == 200 and r.json().get("label") in ("0", "1"):
            r.success()
        else:
            r.failure(f"{r.status_code}: {r.text[:200]}")


class BaselineUser(HttpUser):
    wait_time = between(0.05, 0.2)

    @tag("baseline")
    @task
    def unique_query(self) -> None:
        classify(self, GENERATOR.unique(), "baseline")


class CacheUser(HttpUser):
    wait_time = between(0.01, 0.05)

    @tag("cache")
    @task
    def hot_query(self) -> None:
        classify(self, random.choice(HOT_SET), "cache")


class BatchUser(HttpUser):
    wait_time = between(0.5, 1.5)

    @tag("batch")
    @task
    def burst(self) -> None:
        """8 unique queries at once, then a pause: overlapping bursts from many users form large batches."""
        group = Group()
        for _ in range(8):
            group.spawn(classify, self, GENERATOR.unique(), "batch")
        group.join()


class StressUser(HttpUser):
    wait_time = constant(0)

    @tag("stress")
    @task
    def unique_query(self) -> None:
        classify(self, GENERATOR.unique(), "stress")
