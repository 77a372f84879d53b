//! Dataset versions and exports of the annotation module (N8, N9, N10) end to end: data seeded
//! through the real API, export jobs run by the real worker, files downloaded and read back,
//! the CLI's file and DVC flows against a real `dvc` (from pip) and a local remote.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bulwark_annotation::cli::{self, Destination};
use bulwark_annotation::dataset::{DatasetSpec, Format};
use bulwark_kernel::auth::Role;
use bulwark_tests::{Backend, TestApp, TestAppBuilder};
use serde_json::{Value, json};
use sha2::Digest as _;

const WAIT: Duration = Duration::from_secs(30);

fn builder(backend: Backend) -> TestAppBuilder {
    TestAppBuilder::new(backend).set("annotation.export_poll_interval", "50ms")
}

/// Who labels what: (external id, [(annotator, label)]). img-3 is a three-way tie.
const LABELS: [(&str, [(&str, &str); 3]); 4] = [
    (
        "img-1",
        [("alice", "cat"), ("bob", "cat"), ("carol", "dog")],
    ),
    (
        "img-2",
        [("alice", "dog"), ("bob", "dog"), ("carol", "dog")],
    ),
    (
        "img-3",
        [("alice", "cat"), ("bob", "dog"), ("carol", "bird")],
    ),
    (
        "img-4",
        [("alice", "bird"), ("bob", "bird"), ("carol", "cat")],
    ),
];

struct Seeded {
    project: i64,
    name: String,
    /// external id → item id.
    items: BTreeMap<String, i64>,
    /// (external id, annotator) → annotation id.
    annotations: BTreeMap<(String, String), i64>,
}

async fn json_of(res: reqwest::Response) -> Value {
    res.json().await.expect("json body")
}

/// A project of three classes, overlap 3, four items, each labeled by alice, bob and carol
/// through the annotators' loop (next task, submit).
async fn seed(app: &TestApp) -> Seeded {
    let admin = app.token(Role::Admin);
    let name = format!("pets-{}", bulwark_tests::services::unique(""));
    let res = app
        .post_json(
            "/api/annotation/projects",
            Some(&admin),
            &json!({"name": name, "labels": ["cat", "dog", "bird"], "overlap": 3}),
        )
        .await;
    assert_eq!(res.status(), 201, "create project");
    let project = json_of(res).await["id"].as_i64().expect("project id");
    let lines: String = LABELS
        .iter()
        .map(|(ext, _)| {
            format!(
                "{}\n",
                json!({"external_id": ext, "uri": format!("s3://pets/{ext}.jpg"), "payload": {"w": 640, "h": 480}})
            )
        })
        .collect();
    let res = app
        .request(
            reqwest::Method::POST,
            &format!("/api/annotation/projects/{project}/items"),
            Some(&admin),
        )
        .header("content-type", "application/x-ndjson")
        .body(lines)
        .send()
        .await
        .expect("import");
    assert_eq!(res.status(), 200, "import: {:?}", res.text().await);
    let mut items = BTreeMap::new();
    let mut annotations = BTreeMap::new();
    for who in ["alice", "bob", "carol"] {
        let token = app.token_for(who, Role::Annotator);
        for _ in 0..LABELS.len() {
            let res = app
                .get(
                    &format!("/api/annotation/tasks/next?project={project}"),
                    Some(&token),
                )
                .await;
            assert_eq!(res.status(), 200, "next task for {who}");
            let task = json_of(res).await;
            let item = task["item"]["id"].as_i64().expect("item id");
            let ext = task["item"]["external_id"]
                .as_str()
                .expect("ext")
                .to_owned();
            let label = LABELS
                .iter()
                .find(|(e, _)| *e == ext)
                .and_then(|(_, v)| v.iter().find(|(a, _)| *a == who))
                .map(|(_, l)| *l)
                .expect("a label for this item and annotator");
            let id = submit(app, &token, item, label, None).await;
            items.insert(ext.clone(), item);
            annotations.insert((ext, who.to_owned()), id);
        }
    }
    Seeded {
        project,
        name,
        items,
        annotations,
    }
}

async fn submit(
    app: &TestApp,
    token: &str,
    item: i64,
    label: &str,
    supersedes: Option<i64>,
) -> i64 {
    let res = app
        .post_json(
            "/api/annotation/annotations",
            Some(token),
            &json!({"item_id": item, "labels": [label], "request_id": uuid::Uuid::new_v4().to_string(), "supersedes": supersedes}),
        )
        .await;
    assert_eq!(res.status(), 201, "submit: {:?}", res.text().await);
    json_of(res).await["id"].as_i64().expect("annotation id")
}

/// alice corrects img-1 from cat to dog; returns a time after the original and before it.
async fn correct(app: &TestApp, s: &Seeded) -> String {
    tokio::time::sleep(Duration::from_millis(5)).await;
    let between = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    tokio::time::sleep(Duration::from_millis(5)).await;
    let token = app.token_for("alice", Role::Annotator);
    let item = s.items["img-1"];
    let res = app
        .post_json(
            &format!("/api/annotation/data/{item}/lock"),
            Some(&token),
            &json!({}),
        )
        .await;
    assert_eq!(res.status(), 200, "lock for a correction");
    let old = s.annotations[&("img-1".to_owned(), "alice".to_owned())];
    submit(app, &token, item, "dog", Some(old)).await;
    between
}

/// Request an export; returns the job.
async fn request(app: &TestApp, spec: &Value) -> Value {
    let res = app
        .post_json(
            "/api/annotation/exports",
            Some(&app.token(Role::Admin)),
            spec,
        )
        .await;
    assert_eq!(res.status(), 202, "export: {:?}", res.text().await);
    let job = json_of(res).await;
    // A fast worker may have claimed it already.
    assert!(
        matches!(job["state"].as_str(), Some("pending" | "running" | "done")),
        "{job}"
    );
    job
}

/// Wait for a job to finish; returns it.
async fn finished(app: &TestApp, id: i64) -> Value {
    let admin = app.token(Role::Admin);
    bulwark_tests::services::eventually(WAIT, || async {
        let job = json_of(
            app.get(&format!("/api/annotation/exports/{id}"), Some(&admin))
                .await,
        )
        .await;
        matches!(job["state"].as_str(), Some("done" | "failed")).then_some(job)
    })
    .await
    .unwrap_or_else(|| panic!("export {id} did not finish in {WAIT:?}"))
}

/// Export `spec` through the API and download it: (job, headers, bytes).
async fn export(app: &TestApp, spec: &Value) -> (Value, reqwest::header::HeaderMap, Vec<u8>) {
    let id = request(app, spec).await["id"].as_i64().expect("job id");
    let job = finished(app, id).await;
    assert_eq!(job["state"], "done", "{job}");
    let res = app
        .get(
            &format!("/api/annotation/exports/{id}/download"),
            Some(&app.token(Role::Admin)),
        )
        .await;
    assert_eq!(res.status(), 200);
    let headers = res.headers().clone();
    let bytes = res.bytes().await.expect("download").to_vec();
    (job, headers, bytes)
}

fn sha256(bytes: &[u8]) -> String {
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).expect("utf-8")
}

/// Rows of a Parquet file: (external id, labels, annotator or annotators joined by `,`).
fn parquet_rows(bytes: Vec<u8>) -> Vec<(String, Vec<String>, String)> {
    use arrow::array::{Array, AsArray};
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
        bytes::Bytes::from(bytes),
    )
    .expect("a Parquet file")
    .build()
    .expect("reader");
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch.expect("batch");
        let ext = batch
            .column_by_name("external_id")
            .expect("external_id")
            .as_string::<i32>()
            .clone();
        let labels = batch
            .column_by_name("labels")
            .expect("labels")
            .as_list::<i32>()
            .clone();
        let who = batch
            .column_by_name("annotator")
            .map(|c| c.as_string::<i32>().clone());
        let whos = batch
            .column_by_name("annotators")
            .map(|c| c.as_list::<i32>().clone());
        for i in 0..batch.num_rows() {
            let l = labels.value(i);
            let l = l.as_string::<i32>();
            let labels: Vec<String> = (0..l.len()).map(|j| l.value(j).to_owned()).collect();
            let annotator = match (&who, &whos) {
                (Some(w), _) => w.value(i).to_owned(),
                (None, Some(ws)) => {
                    let w = ws.value(i);
                    let w = w.as_string::<i32>();
                    (0..w.len())
                        .map(|j| w.value(j))
                        .collect::<Vec<_>>()
                        .join(",")
                }
                (None, None) => panic!("no annotator column"),
            };
            out.push((ext.value(i).to_owned(), labels, annotator));
        }
    }
    out
}

/// N8, N9: the same spec gives the same bytes in every format; as_of, exclusions, reviews and
/// consolidation select what they say; the Parquet file reads back; the CLI writes the same bytes.
async fn exports_are_reproducible_and_select_what_the_spec_says(backend: Backend) {
    let app = builder(backend).start().await;
    let s = seed(&app).await;
    let before_correction = correct(&app, &s).await;
    let p = s.project;
    let done_before = app
        .metric(
            "bulwark_annotation_exports_total",
            &[("format", "csv"), ("outcome", "done")],
        )
        .await
        .unwrap_or(0.0);

    // Same spec twice → byte-identical files and equal sha256, in all three formats (N8).
    // Without `as_of` each job is pinned to its request time; nothing changed in between.
    let mut csv_now = Vec::new();
    for format in ["csv", "jsonl", "parquet"] {
        let spec = json!({"project": p, "format": format});
        let (a, ha, fa) = export(&app, &spec).await;
        let (b, _, fb) = export(&app, &spec).await;
        assert_eq!(fa, fb, "{format}: two exports of one spec differ");
        assert_eq!(a["sha256"], b["sha256"], "{format}");
        assert_eq!(a["sha256"].as_str(), Some(sha256(&fa).as_str()), "{format}");
        let m = &a["manifest"];
        assert_eq!(m["file"]["sha256"], a["sha256"]);
        assert_eq!(m["file"]["bytes"].as_u64(), Some(fa.len() as u64));
        assert_eq!(m["counts"]["rows"], 12, "{format}: {m}");
        assert_eq!(m["counts"]["items"], 4);
        assert_eq!(m["counts"]["annotators"], 3);
        assert!(m["spec"]["as_of"].is_string(), "as_of is pinned: {m}");
        assert!(m["bulwark_version"].is_string() && m["generated_at"].is_string());
        assert_eq!(a["rows_done"], 12);
        assert_eq!(a["rows_total"], 12);
        let want_type = Format::parse(format).expect("format").content_type();
        assert_eq!(ha["content-type"], want_type);
        let disposition = ha["content-disposition"].to_str().expect("ascii");
        assert!(
            disposition.starts_with("attachment; filename=\"pets-")
                && disposition.ends_with(&format!(".{format}\"")),
            "{disposition}"
        );
        match format {
            "csv" => csv_now = fa,
            "jsonl" => {
                let first: Value =
                    serde_json::from_str(text(&fa).lines().next().expect("a line")).expect("json");
                assert_eq!(first["external_id"], "img-1");
                assert_eq!(first["annotator"], "alice");
                assert_eq!(first["labels"], json!(["dog"]), "the correction counts");
                assert_eq!(first["payload"], json!({"w": 640, "h": 480}));
                assert_eq!(first["uri"], "s3://pets/img-1.jpg");
                assert!(first["annotation_id"].is_i64() && first["item_id"].is_i64());
            }
            _ => {
                let rows = parquet_rows(fa);
                assert_eq!(rows.len(), 12);
                assert_eq!(
                    rows[0],
                    ("img-1".into(), vec!["dog".into()], "alice".into())
                );
                assert_eq!(
                    rows[5],
                    ("img-2".into(), vec!["dog".into()], "carol".into())
                );
                assert_eq!(
                    rows[8],
                    ("img-3".into(), vec!["bird".into()], "carol".into())
                );
            }
        }
    }
    let csv = text(&csv_now);
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("external_id,uri,label,annotator"));
    assert_eq!(lines.next(), Some("img-1,s3://pets/img-1.jpg,dog,alice"));
    assert_eq!(lines.next(), Some("img-1,s3://pets/img-1.jpg,cat,bob"));
    assert_eq!(csv.lines().count(), 13, "{csv}");
    let done_after = app
        .metric(
            "bulwark_annotation_exports_total",
            &[("format", "csv"), ("outcome", "done")],
        )
        .await
        .unwrap_or(0.0);
    assert!(
        done_after >= done_before + 2.0,
        "{done_before} → {done_after}"
    );

    // as_of before the correction gives the old label; the log as it is gives the new (N8).
    let (old, _, f) = export(
        &app,
        &json!({"project": p, "format": "csv", "as_of": before_correction}),
    )
    .await;
    assert!(
        text(&f).contains("img-1,s3://pets/img-1.jpg,cat,alice\n"),
        "{}",
        text(&f)
    );
    assert_ne!(old["sha256"], json!(sha256(&csv_now)));
    // Pinned explicitly to now: the same bytes as the unpinned export.
    let now = chrono::Utc::now().to_rfc3339();
    let (_, _, f) = export(&app, &json!({"project": p, "format": "csv", "as_of": now})).await;
    assert_eq!(f, csv_now);

    // Without an annotator (N8): their rows go, the hash changes, and the manifest counts them.
    let (j, _, f) = export(
        &app,
        &json!({"project": p, "format": "csv", "exclude_annotators": ["carol"]}),
    )
    .await;
    assert!(!text(&f).contains("carol"));
    assert_eq!(text(&f).lines().count(), 9);
    assert_ne!(sha256(&f), sha256(&csv_now));
    assert_eq!(j["manifest"]["counts"]["skipped"]["excluded_annotator"], 4);
    assert_eq!(j["manifest"]["counts"]["annotators"], 2);

    // Consolidation by majority (N5 via N8): the three-way tie on img-3 is left out and counted.
    for format in ["csv", "parquet"] {
        let (j, _, f) = export(
            &app,
            &json!({"project": p, "format": format, "consolidation": {"min_votes": 2}}),
        )
        .await;
        let c = &j["manifest"]["counts"];
        assert_eq!(c["rows"], 3, "{c}");
        assert_eq!(c["skipped"]["unresolved"], 1);
        if format == "csv" {
            assert_eq!(
                text(&f),
                "external_id,uri,label\n\
                 img-1,s3://pets/img-1.jpg,dog\n\
                 img-2,s3://pets/img-2.jpg,dog\n\
                 img-4,s3://pets/img-4.jpg,bird\n"
            );
        } else {
            let rows = parquet_rows(f);
            assert_eq!(
                rows,
                vec![
                    ("img-1".into(), vec!["dog".into()], "alice,bob,carol".into()),
                    ("img-2".into(), vec!["dog".into()], "alice,bob,carol".into()),
                    (
                        "img-4".into(),
                        vec!["bird".into()],
                        "alice,bob,carol".into()
                    ),
                ]
            );
        }
    }
    // Too few voters: min_votes 4 leaves every item out as insufficient.
    let (j, _, _) = export(
        &app,
        &json!({"project": p, "format": "jsonl", "consolidation": {"min_votes": 4}}),
    )
    .await;
    assert_eq!(j["manifest"]["counts"]["skipped"]["insufficient"], 4);
    assert_eq!(j["manifest"]["counts"]["rows"], 0);
    // min_agreement: img-1 (2 of 3 after the correction), img-2 (3/3), img-4 (2/3) keep; img-3 (1/3) goes.
    let (j, _, f) = export(
        &app,
        &json!({"project": p, "format": "csv", "min_agreement": 0.6}),
    )
    .await;
    assert_eq!(j["manifest"]["counts"]["skipped"]["below_agreement"], 1);
    assert!(!text(&f).contains("img-3"));

    // Reviewed only (N9): an accept counts, a reject and no review do not.
    let reviewer = app.token_for("rita", Role::Reviewer);
    for (who, verdict) in [("alice", "accept"), ("bob", "reject")] {
        let id = s.annotations[&("img-2".to_owned(), who.to_owned())];
        let res = app
            .post_json(
                &format!("/api/annotation/annotations/{id}/reviews"),
                Some(&reviewer),
                &json!({"verdict": verdict}),
            )
            .await;
        assert_eq!(res.status(), 201);
    }
    let (j, _, f) = export(
        &app,
        &json!({"project": p, "format": "csv", "reviewed_only": true}),
    )
    .await;
    assert_eq!(
        text(&f),
        "external_id,uri,label,annotator\nimg-2,s3://pets/img-2.jpg,dog,alice\n"
    );
    let skipped = &j["manifest"]["counts"]["skipped"];
    assert_eq!(skipped["rejected"], 1);
    assert_eq!(skipped["not_reviewed"], 10);

    // The CLI writes the same bytes as the API, and the manifest beside them (N9).
    let db = bulwark_kernel::db::connect(&app.settings.kernel.database)
        .await
        .expect("connect");
    let dir = tempfile::tempdir().expect("tmp");
    let spec: DatasetSpec =
        serde_json::from_value(json!({"project": p, "format": "parquet"})).expect("spec");
    let (_, _, api_parquet) = export(&app, &json!({"project": p, "format": "parquet"})).await;
    let out = dir.path().join("pets.parquet");
    let done = cli::export(
        &db,
        &Default::default(),
        &spec,
        Destination::File(Some(out.clone())),
        false,
    )
    .await
    .expect("cli export");
    assert_eq!(std::fs::read(&out).expect("file"), api_parquet);
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("pets.parquet.manifest.json")).expect("manifest"),
    )
    .expect("json");
    assert_eq!(manifest["file"]["sha256"], json!(sha256(&api_parquet)));
    assert_eq!(done.manifest.counts.rows, 12);
    assert_eq!(s.name, manifest["project"]["name"]);
}

/// N9: what the API refuses, and with which status.
async fn bad_requests_are_refused(backend: Backend) {
    let app = builder(backend)
        // No job ever runs here: the worker looks once at start, then in an hour.
        .set("annotation.export_poll_interval", "1h")
        .start()
        .await;
    let admin = app.token(Role::Admin);
    let res = app
        .post_json(
            "/api/annotation/projects",
            Some(&admin),
            &json!({"name": bulwark_tests::services::unique("p"), "labels": ["a", "b"]}),
        )
        .await;
    let p = json_of(res).await["id"].as_i64().expect("id");
    let post = |body: Value, token: String| {
        let app = &app;
        async move {
            app.post_json("/api/annotation/exports", Some(&token), &body)
                .await
        }
    };
    // Unknown project → 404.
    let res = post(json!({"project": 999_999, "format": "csv"}), admin.clone()).await;
    assert_eq!(res.status(), 404);
    // Unknown field → 400 naming it.
    let res = post(
        json!({"project": p, "format": "csv", "colour": 1}),
        admin.clone(),
    )
    .await;
    assert_eq!(res.status(), 400);
    let body = json_of(res).await;
    assert_eq!(body["field"], "colour", "{body}");
    // Bad format → 400 naming `format`.
    let res = post(json!({"project": p, "format": "xlsx"}), admin.clone()).await;
    assert_eq!(res.status(), 400);
    assert_eq!(json_of(res).await["field"], "format");
    // min_agreement outside [0, 1] → 400 naming it.
    let res = post(
        json!({"project": p, "format": "csv", "min_agreement": 1.5}),
        admin.clone(),
    )
    .await;
    assert_eq!(res.status(), 400);
    assert_eq!(json_of(res).await["field"], "min_agreement");
    // Bad as_of → 400.
    let res = post(
        json!({"project": p, "format": "csv", "as_of": "yesterday"}),
        admin.clone(),
    )
    .await;
    assert_eq!(res.status(), 400);
    // Wrong role → 403 (exports are admin's), no token → 401.
    for role in [Role::Annotator, Role::Reviewer, Role::Viewer] {
        let res = post(json!({"project": p, "format": "csv"}), app.token(role)).await;
        assert_eq!(res.status(), 403, "{role:?}");
    }
    let res = app
        .post_json(
            "/api/annotation/exports",
            None,
            &json!({"project": p, "format": "csv"}),
        )
        .await;
    assert_eq!(res.status(), 401);

    // A pending job: 202 with a Location, 409 on download (state named), 404 for an unknown id.
    let res = post(json!({"project": p, "format": "parquet"}), admin.clone()).await;
    assert_eq!(res.status(), 202);
    let location = res.headers()["location"]
        .to_str()
        .expect("ascii")
        .to_owned();
    let job = json_of(res).await;
    let id = job["id"].as_i64().expect("id");
    assert_eq!(location, format!("/api/annotation/exports/{id}"));
    let res = app
        .get(
            &format!("/api/annotation/exports/{id}/download"),
            Some(&admin),
        )
        .await;
    assert_eq!(res.status(), 409);
    assert_eq!(json_of(res).await["state"], "pending");
    let res = app
        .get(
            &format!("/api/annotation/exports/{id}"),
            Some(&app.token(Role::Viewer)),
        )
        .await;
    assert_eq!(res.status(), 403);
    for path in [
        "/api/annotation/exports/987654".to_owned(),
        "/api/annotation/exports/987654/download".to_owned(),
    ] {
        assert_eq!(app.get(&path, Some(&admin)).await.status(), 404, "{path}");
    }
}

bulwark_tests::each_backend!(
    exports_are_reproducible_and_select_what_the_spec_says,
    bad_requests_are_refused
);

/// N9: two claimers on one database never get the same job (the claim is one atomic UPDATE).
async fn a_job_is_claimed_once(backend: Backend) {
    let app = builder(backend)
        .set("annotation.export_poll_interval", "1h")
        .start()
        .await;
    let admin = app.token(Role::Admin);
    let res = app
        .post_json(
            "/api/annotation/projects",
            Some(&admin),
            &json!({"name": bulwark_tests::services::unique("p"), "labels": ["a"]}),
        )
        .await;
    let p = json_of(res).await["id"].as_i64().expect("id");
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(
            request(&app, &json!({"project": p, "format": "csv"})).await["id"]
                .as_i64()
                .expect("id"),
        );
    }
    let db = bulwark_kernel::db::connect(&app.settings.kernel.database)
        .await
        .expect("connect");
    let claims = futures::future::join_all((0..8).map(|_| {
        let db = db.clone();
        async move {
            bulwark_annotation::export::claim(
                &db,
                bulwark_annotation::store::now_ms(),
                Duration::from_secs(3600),
            )
            .await
            .expect("claim")
            .map(|c| c.job.id)
        }
    }))
    .await;
    let mut got: Vec<i64> = claims.into_iter().flatten().collect();
    got.sort_unstable();
    let before = got.len();
    got.dedup();
    assert_eq!(got.len(), before, "a job was claimed twice: {got:?}");
    assert!(got.iter().all(|id| ids.contains(id)));
    // A stale running job (its worker gone) is claimed again.
    let later = bulwark_annotation::store::now_ms() + 7_200_000;
    let again = bulwark_annotation::export::claim(&db, later, Duration::from_secs(3600))
        .await
        .expect("claim");
    assert!(again.is_some(), "a stale running job is claimable");
}

bulwark_tests::each_backend!(a_job_is_claimed_once);

// ---- DVC (N10) ----

/// The `dvc` the test runs: `BULWARK_TEST_DVC` (scripts/test sets it to the venv's), else `dvc`
/// on PATH. `None` (with a note) when neither runs, unless real services are required.
fn dvc_bin() -> Option<String> {
    let candidates = std::env::var("BULWARK_TEST_DVC")
        .ok()
        .filter(|v| !v.is_empty())
        .into_iter()
        .chain(["dvc".to_owned()]);
    for c in candidates {
        let ok = std::process::Command::new(&c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return Some(c);
        }
    }
    assert!(
        !bulwark_tests::services::require_services(),
        "dvc is not installed (set BULWARK_TEST_DVC) but BULWARK_TEST_REQUIRE_SERVICES=1"
    );
    eprintln!("note: no dvc (BULWARK_TEST_DVC unset, none on PATH); the DVC test is skipped");
    None
}

fn run(dir: &Path, program: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A git repository with DVC and a local default remote; returns (repo, remote).
fn dvc_repo(root: &Path, dvc: &str) -> (PathBuf, PathBuf) {
    let repo = root.join("repo");
    let remote = root.join("remote");
    std::fs::create_dir_all(&repo).expect("mkdir");
    run(&repo, "git", &["init", "-q", "-b", "main"]);
    run(&repo, "git", &["config", "user.email", "ci@bulwark.test"]);
    run(&repo, "git", &["config", "user.name", "Bulwark CI"]);
    run(&repo, dvc, &["init", "-q"]);
    run(&repo, dvc, &["config", "core.analytics", "false"]);
    run(&repo, dvc, &["config", "core.check_update", "false"]);
    let remote_s = remote.display().to_string();
    run(&repo, dvc, &["remote", "add", "-d", "local", &remote_s]);
    run(&repo, "git", &["add", "-A"]);
    run(&repo, "git", &["commit", "-q", "-m", "init"]);
    (repo, remote)
}

#[tokio::test]
async fn dvc_flow_commits_pushes_and_restores_on_failure() {
    let Some(dvc) = dvc_bin() else { return };
    let app = builder(Backend::Embedded).start().await;
    let s = seed(&app).await;
    let db = bulwark_kernel::db::connect(&app.settings.kernel.database)
        .await
        .expect("connect");
    let tmp = tempfile::tempdir().expect("tmp");
    let (repo, remote) = dvc_repo(tmp.path(), &dvc);
    let cfg = bulwark_annotation::AnnotationConfig {
        dvc_bin: dvc.clone(),
        ..Default::default()
    };
    let spec: DatasetSpec = serde_json::from_value(
        json!({"project": s.project, "format": "csv", "reviewed_only": false}),
    )
    .expect("spec");
    let dest = || Destination::Dvc {
        repo: repo.clone(),
        path: None,
    };

    let done = cli::export(&db, &cfg, &spec, dest(), false)
        .await
        .expect("export into the DVC repository");
    let (data_commit, manifest_commit) = done.commits.clone().expect("commits");
    assert_eq!(run(&repo, "git", &["rev-parse", "HEAD"]), manifest_commit);
    assert_eq!(run(&repo, "git", &["rev-parse", "HEAD~1"]), data_commit);
    let message = run(&repo, "git", &["log", "-1", "--format=%s", &data_commit]);
    assert!(
        message.starts_with(&format!("dataset {} csv as-of ", s.name))
            && message.contains(" exported "),
        "{message}"
    );
    let files = run(
        &repo,
        "git",
        &["show", "--name-only", "--format=", &data_commit],
    );
    let rel = format!("datasets/{0}/{0}.csv", s.name);
    assert!(files.contains(&format!("{rel}.dvc")), "{files}");
    assert!(
        files.contains(&format!("datasets/{}/.gitignore", s.name)),
        "{files}"
    );
    assert!(
        !files.contains(&format!("{rel}\n")) && !files.ends_with(&rel),
        "the data itself is not in git: {files}"
    );
    assert_eq!(
        run(&repo, "git", &["status", "--porcelain"]),
        "",
        "clean after export"
    );
    // The manifest in the repository names the data commit, and the remote holds the file.
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(repo.join(format!("{rel}.manifest.json"))).expect("manifest"),
    )
    .expect("json");
    assert_eq!(manifest["dvc"]["commit"], json!(data_commit));
    assert_eq!(manifest["dvc"]["path"], json!(rel));
    let md5 = manifest["dvc"]["md5"].as_str().expect("md5").to_owned();
    let object = remote.join("files/md5").join(&md5[..2]).join(&md5[2..]);
    let data = std::fs::read(repo.join(&rel)).expect("data file");
    assert_eq!(std::fs::read(&object).expect("object on the remote"), data);
    assert_eq!(manifest["file"]["sha256"], json!(sha256(&data)));

    // A failing push (the remote under a regular file cannot be created): an error, and the
    // repository as it was — HEAD, status, the data file.
    let blocker = tmp.path().join("not-a-dir");
    std::fs::write(&blocker, b"x").expect("write");
    let bad = blocker.join("remote").display().to_string();
    run(&repo, &dvc, &["remote", "modify", "local", "url", &bad]);
    run(&repo, "git", &["commit", "-q", "-am", "remote moves"]);
    let head = run(&repo, "git", &["rev-parse", "HEAD"]);
    let other: DatasetSpec = serde_json::from_value(
        json!({"project": s.project, "format": "csv", "exclude_annotators": ["carol"]}),
    )
    .expect("spec");
    let e = cli::export(&db, &cfg, &other, dest(), false)
        .await
        .expect_err("push fails");
    assert!(e.to_string().contains("push"), "{e}");
    assert_eq!(run(&repo, "git", &["rev-parse", "HEAD"]), head);
    assert_eq!(run(&repo, "git", &["status", "--porcelain"]), "", "{e}");
    assert_eq!(
        std::fs::read(repo.join(&rel)).expect("data file"),
        data,
        "the old data is back"
    );

    // A missing dvc executable: a clear error naming it, nothing touched.
    let missing = bulwark_annotation::AnnotationConfig {
        dvc_bin: "/nonexistent/bin/dvc".into(),
        ..Default::default()
    };
    let e = cli::export(&db, &missing, &other, dest(), false)
        .await
        .expect_err("no dvc");
    assert!(e.to_string().contains("/nonexistent/bin/dvc"), "{e}");
    assert_eq!(run(&repo, "git", &["rev-parse", "HEAD"]), head);
    assert_eq!(run(&repo, "git", &["status", "--porcelain"]), "");

    // Not a DVC repository: an error naming it.
    let plain = tmp.path().join("plain");
    std::fs::create_dir_all(&plain).expect("mkdir");
    run(&plain, "git", &["init", "-q"]);
    let e = cli::export(
        &db,
        &cfg,
        &spec,
        Destination::Dvc {
            repo: plain.clone(),
            path: None,
        },
        false,
    )
    .await
    .expect_err("not a DVC repository");
    assert!(
        e.to_string().contains(&plain.display().to_string()) && e.to_string().contains(".dvc"),
        "{e}"
    );
}

// ---- scale (N7, N8) ----

/// Peak resident memory of this process, in KiB (Linux).
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// An export of `BULWARK_TEST_EXPORT_ROWS` annotations (e.g. 100000), one per item, seeded with
/// bulk SQL, in every format: prints the time, the size and the peak memory. Gated by the
/// variable (slow); without it, a note.
#[tokio::test]
async fn export_scales_with_flat_memory() {
    let Some(n) = std::env::var("BULWARK_TEST_EXPORT_ROWS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    else {
        eprintln!("note: BULWARK_TEST_EXPORT_ROWS not set; the export scale run is skipped");
        return;
    };
    use sea_orm::ConnectionTrait as _;
    let app = builder(Backend::Embedded).start().await;
    let admin = app.token(Role::Admin);
    let res = app
        .post_json(
            "/api/annotation/projects",
            Some(&admin),
            &json!({"name": "scale", "labels": ["cat", "dog", "bird"]}),
        )
        .await;
    let p = json_of(res).await["id"].as_i64().expect("id");
    let db = bulwark_kernel::db::connect(&app.settings.kernel.database)
        .await
        .expect("connect");
    let exec = |text: String| {
        let db = &db;
        async move {
            db.execute(sea_orm::Statement::from_string(
                db.get_database_backend(),
                text,
            ))
            .await
            .expect("bulk insert");
        }
    };
    let started = std::time::Instant::now();
    let batch = 1000;
    for start in (0..n).step_by(batch) {
        let end = (start + batch as u64).min(n);
        let values: Vec<String> = (start..end)
            .map(|i| format!("({p}, 'item-{i:08}', 's3://scale/{i}.jpg', '{{\"i\":{i}}}', NULL, 0, 1, 1, true, 0)"))
            .collect();
        exec(format!(
            "INSERT INTO annotation_items (project_id, external_id, uri, payload, metadata, priority, version, annotation_count, done, created_at_ms) VALUES {}",
            values.join(",")
        ))
        .await;
    }
    exec(format!(
        "INSERT INTO annotation_annotations (project_id, item_id, annotator, labels, supersedes, request_id, lead_time_ms, created_at_ms) \
         SELECT {p}, id, 'ann-' || CAST(id % 7 AS TEXT), CASE id % 3 WHEN 0 THEN '[\"cat\"]' WHEN 1 THEN '[\"dog\"]' ELSE '[\"bird\"]' END, \
           NULL, 'r-' || CAST(id AS TEXT), NULL, 1 FROM annotation_items WHERE project_id = {p}"
    ))
    .await;
    eprintln!(
        "seeded {n} items and annotations in {:?}",
        started.elapsed()
    );
    let dir = tempfile::tempdir().expect("tmp");
    for format in ["csv", "jsonl", "parquet"] {
        let spec: DatasetSpec =
            serde_json::from_value(json!({"project": p, "format": format})).expect("spec");
        let out = dir.path().join(format!("scale.{format}"));
        let rss_before = peak_rss_kib();
        let t = std::time::Instant::now();
        let done = cli::export(
            &db,
            &Default::default(),
            &spec,
            Destination::File(Some(out.clone())),
            false,
        )
        .await
        .expect("export");
        let took = t.elapsed();
        assert_eq!(done.manifest.counts.rows, n);
        eprintln!(
            "{format}: {n} rows in {took:?}, {} bytes, peak RSS {:?} → {:?} KiB",
            done.manifest.file.bytes,
            rss_before,
            peak_rss_kib()
        );
    }
}
