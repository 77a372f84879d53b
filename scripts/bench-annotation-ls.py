"""Label Studio side of scripts/bench-annotation: seeds a Label Studio database through its own
Django models (run with the Label Studio venv's Python, Django settings from the environment).

    python scripts/bench-annotation-ls.py --items 1000000 --annotators 16 --out DIR

Creates (once; a second run reuses what is there and adds only missing tasks):
- an organization with legacy API tokens enabled and an owner user;
- ANNOTATORS users, each an organization member with a legacy token (`Authorization: Token ...`);
- a project "bench" (text classification, 3 choices, sequential sampling, 1 annotation per task);
- ITEMS tasks {"text": "item N"} created with bulk_create in batches (the import API would
  add per-task work; its throughput is measured separately by the bench binary).
Writes DIR/ls-project (the project id) and DIR/ls-tokens (one token a line).
"""

import argparse
import os
import sys
import time

LABEL_CONFIG = """<View>
  <Text name="text" value="$text"/>
  <Choices name="label" toName="text" choice="single">
    <Choice value="pos"/>
    <Choice value="neg"/>
    <Choice value="neutral"/>
  </Choices>
</View>"""


def setup_django():
    import label_studio

    ls_path = os.path.dirname(label_studio.__file__)
    sys.path.insert(0, ls_path)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "label_studio.core.settings.label_studio")
    import django

    django.setup()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--annotators", type=int, default=16)
    p.add_argument("--batch", type=int, default=5000)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    setup_django()

    from django.db import transaction
    from organizations.models import Organization
    from projects.models import Project
    from rest_framework.authtoken.models import Token
    from tasks.models import Task
    from users.models import User

    owner, _ = User.objects.get_or_create(email="bench-owner@localhost", defaults={"username": "bench-owner"})
    org = Organization.objects.filter(created_by=owner).first()
    if org is None:
        org = Organization.create_organization(created_by=owner, title="bench", legacy_api_tokens_enabled=True)
    jwt = getattr(org, "jwt", None)
    if jwt is not None and not jwt.legacy_api_tokens_enabled:
        jwt.legacy_api_tokens_enabled = True
        jwt.save()
    owner.active_organization = org
    owner.save(update_fields=["active_organization"])

    tokens = []
    for i in range(a.annotators):
        u, created = User.objects.get_or_create(
            email=f"bench-annotator-{i}@localhost", defaults={"username": f"bench-annotator-{i}"}
        )
        if created:
            u.set_password(f"bench-annotator-{i}-pw")
        org.add_user(u)
        u.active_organization = org
        u.save()
        tokens.append(Token.objects.get_or_create(user=u)[0].key)

    project = Project.objects.filter(title="bench", organization=org).first()
    if project is None:
        project = Project.objects.create(
            title="bench",
            created_by=owner,
            organization=org,
            label_config=LABEL_CONFIG,
            sampling=Project.SEQUENCE,
            maximum_annotations=1,
        )

    have = Task.objects.filter(project=project).count()
    t0 = time.monotonic()
    n = have
    while n < a.items:
        m = min(a.batch, a.items - n)
        with transaction.atomic():
            Task.objects.bulk_create(
                [Task(project=project, data={"text": f"item {k}"}, inner_id=k + 1) for k in range(n, n + m)],
                batch_size=a.batch,
            )
        n += m
        if (n - have) % 100_000 < a.batch or n == a.items:
            rate = (n - have) / max(time.monotonic() - t0, 1e-9)
            print(f"label studio: {n}/{a.items} tasks ({rate:,.0f}/s)", file=sys.stderr, flush=True)
    if n > have:
        # What the import path does after adding tasks: the data manager learns the data columns.
        first = Task.objects.filter(project=project).order_by("id").first()
        project.summary.update_data_columns([first])

    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "ls-project"), "w") as f:
        f.write(f"{project.id}\n")
    with open(os.path.join(a.out, "ls-tokens"), "w") as f:
        f.write("\n".join(tokens) + "\n")
    print(f"label studio: project {project.id}, {n} tasks ({n - have} added), {len(tokens)} annotators")


if __name__ == "__main__":
    main()
