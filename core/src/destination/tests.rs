use super::*;

fn secrets(pairs: &[(&str, &str)]) -> Secrets {
    Secrets {
        values: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    }
}

#[tokio::test]
async fn local_folders_are_probed_without_being_created() {
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let rules = Destinations::new(vec![root.clone()], "s3://store", BTreeMap::new());
    let missing = root.join("a/b");
    rules
        .probe("acme", &format!("file://{}", missing.display()), None)
        .await
        .unwrap();
    assert!(!root.join("a").exists(), "the probe creates nothing");
    assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);

    let file = root.join("plain");
    std::fs::write(&file, b"x").unwrap();
    let error = rules
        .probe("acme", &file.join("sub").display().to_string(), None)
        .await
        .unwrap_err();
    assert_eq!(error.failure, ProbeFailure::Refused);
    assert!(error.message.contains("is a file"), "{error}");

    let error = rules
        .probe("acme", &format!("{}/../etc", root.display()), None)
        .await
        .unwrap_err();
    assert!(error.message.contains("'..'"), "{error}");
}

#[tokio::test]
async fn no_root_allows_no_local_folder_and_outside_answers_alike() {
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let none = Destinations::new(Vec::new(), "s3://store", BTreeMap::new());
    assert!(matches!(
        none.check("acme", &format!("file://{}", root.display()), None),
        Err(DestinationError::OutsideRoots { .. })
    ));

    let rules = Destinations::new(vec![root.join("allowed")], "s3://store", BTreeMap::new());
    let existing = root.join("elsewhere");
    std::fs::create_dir(&existing).unwrap();
    let missing = root.join("nowhere");
    let answer = |path: &Path| {
        let rules = rules.clone();
        let uri = format!("file://{}", path.display());
        async move {
            let probe = rules.probe("acme", &uri, None).await.unwrap_err();
            let check = rules.check("acme", &uri, None).unwrap_err().to_string();
            (
                probe.failure,
                probe.message.replace(&uri, "<uri>"),
                check.replace(&uri, "<uri>"),
            )
        }
    };
    let (a, b) = (answer(&existing).await, answer(&missing).await);
    assert_eq!(a, b);
    assert_eq!(a.0, ProbeFailure::Refused);
    assert!(
        a.1.contains("not inside an allowed destination root"),
        "{a:?}"
    );
    assert!(
        rules
            .check("acme", &format!("{}/allowed/x", root.display()), None)
            .is_ok()
    );
}

#[test]
fn symlinks_are_resolved_before_the_check() {
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let allowed = root.join("allowed");
    let outside = root.join("outside");
    std::fs::create_dir_all(&allowed).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, allowed.join("out")).unwrap();
    std::os::unix::fs::symlink(root.join("gone"), allowed.join("dangling")).unwrap();
    let rules = Destinations::new(vec![allowed.clone()], "s3://store", BTreeMap::new());
    for uri in [allowed.join("out/x"), allowed.join("dangling/x")] {
        let uri = uri.display().to_string();
        assert!(
            matches!(
                rules.open("acme", &uri, None),
                Err(DestinationError::OutsideRoots { .. })
            ),
            "{uri}"
        );
    }
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
    assert!(!root.join("gone").exists());
    // The store's own folder is never a destination.
    let rules = Destinations::new(
        vec![root.clone()],
        &allowed.join("store").display().to_string(),
        BTreeMap::new(),
    );
    assert!(matches!(
        rules.check("acme", &allowed.display().to_string(), None),
        Err(DestinationError::StoreOverlap { .. })
    ));
    assert!(
        rules
            .check("acme", &outside.display().to_string(), None)
            .is_ok()
    );
}

#[test]
fn s3_destinations_need_their_own_credentials_and_another_bucket() {
    let named = DestinationCredential {
        tenants: vec!["acme".into()],
        access_key_id: "AK".into(),
        secret_access_key: "SK".into(),
        ..Default::default()
    };
    let rules = Destinations::new(
        Vec::new(),
        "s3://fleet/store",
        [("deliveries".to_string(), named)].into(),
    );
    let keys = secrets(&[
        (secret_keys::ACCESS_KEY_ID, "a"),
        (secret_keys::SECRET_ACCESS_KEY, "b"),
    ]);
    assert!(matches!(
        rules.check("acme", "s3://out/x", None),
        Err(DestinationError::NoCredentials { .. })
    ));
    assert!(matches!(
        rules.check(
            "acme",
            "s3://out/x",
            Some(&secrets(&[(secret_keys::ACCESS_KEY_ID, "a")]))
        ),
        Err(DestinationError::NoCredentials { .. })
    ));
    rules.check("acme", "s3://out/x", Some(&keys)).unwrap();
    for uri in ["s3://fleet", "s3://fleet/store/x", "s3://fleet/other"] {
        assert!(
            matches!(
                rules.check("acme", uri, Some(&keys)),
                Err(DestinationError::StoreOverlap { .. })
            ),
            "{uri}"
        );
    }
    rules
        .check("acme", "s3://out/x?credential=deliveries", None)
        .unwrap();
    for (tenant, uri) in [
        ("globex", "s3://out/x?credential=deliveries"),
        ("acme", "s3://out/x?credential=nope"),
    ] {
        let error = rules.check(tenant, uri, Some(&keys)).unwrap_err();
        assert!(
            matches!(error, DestinationError::UnknownCredential { .. }),
            "{error}"
        );
    }
    assert!(matches!(
        rules.check("acme", "s3://out/x?region=eu", Some(&keys)),
        Err(DestinationError::BadQuery { .. })
    ));
    assert!(matches!(
        rules.check("acme", "s3://AK:SK@out/x", Some(&keys)),
        Err(DestinationError::BadUri { .. })
    ));

    // A job's own endpoint must be a public address.
    for endpoint in [
        "http://127.0.0.1:9000",
        "http://169.254.169.254",
        "ftp://s3.example",
    ] {
        let mut own = keys.clone();
        own.values
            .insert(secret_keys::ENDPOINT_URL.into(), endpoint.into());
        assert!(
            matches!(
                rules.check("acme", "s3://out/x", Some(&own)),
                Err(DestinationError::Endpoint { .. })
            ),
            "{endpoint}"
        );
        let open = rules.clone().allow_private_endpoints(true);
        assert_eq!(
            open.check("acme", "s3://out/x", Some(&own)).is_ok(),
            endpoint.starts_with("http"),
            "{endpoint}"
        );
    }
}

/// A GCS key that needs no private key (`disable_oauth`), as emulators take.
fn gcs_key(base_url: Option<&str>) -> String {
    let mut key = serde_json::json!({
        "private_key": "",
        "private_key_id": "",
        "client_email": "deliver@acme.iam.gserviceaccount.com",
        "disable_oauth": true,
    });
    if let Some(base_url) = base_url {
        key["gcs_base_url"] = base_url.into();
    }
    key.to_string()
}

#[test]
fn gcs_and_azure_destinations_follow_the_s3_rules() {
    let fleet = DestinationCredential {
        tenants: vec!["acme".into()],
        azure_account: Some("fleetacct".into()),
        azure_access_key: Some("a2V5".into()),
        ..Default::default()
    };
    let google = DestinationCredential {
        tenants: vec!["acme".into()],
        gcs_service_account_key: Some(gcs_key(None)),
        ..Default::default()
    };
    let rules = Destinations::new(
        Vec::new(),
        "gs://fleet/store",
        [("az".to_string(), fleet), ("gcs".to_string(), google)].into(),
    );
    // No keys: refused, naming what to set.
    for uri in ["gs://out/x", "az://box/x", "azure://box/x"] {
        let error = rules.check("acme", uri, None).unwrap_err();
        assert!(
            matches!(error, DestinationError::NoCredentials { .. }),
            "{uri}: {error}"
        );
    }
    // An account without a key or SAS token would fall back to a managed
    // identity: refused.
    let account_only = secrets(&[(secret_keys::AZURE_ACCOUNT, "acct")]);
    assert!(matches!(
        rules.check("acme", "az://box/x", Some(&account_only)),
        Err(DestinationError::NoCredentials { .. })
    ));
    let azure = secrets(&[
        (secret_keys::AZURE_ACCOUNT, "acct"),
        (secret_keys::AZURE_ACCOUNT_KEY, "a2V5"),
    ]);
    rules.check("acme", "az://box/x", Some(&azure)).unwrap();
    let store = rules.open("acme", "azure://box/x/", Some(&azure)).unwrap();
    assert_eq!(store.root(), "az://box/x");
    let google = secrets(&[(secret_keys::GCS_SERVICE_ACCOUNT_KEY, &gcs_key(None))]);
    rules.check("acme", "gs://out/x", Some(&google)).unwrap();
    // The store's bucket, in the same cloud only.
    assert!(matches!(
        rules.check("acme", "gs://fleet/other", Some(&google)),
        Err(DestinationError::StoreOverlap { .. })
    ));
    rules
        .check("acme", "az://fleet/other", Some(&azure))
        .unwrap();
    // Fleet credentials: only for the tenants they list.
    rules
        .check("acme", "az://box/x?credential=az", None)
        .unwrap();
    rules
        .check("acme", "gs://out/x?credential=gcs", None)
        .unwrap();
    for (tenant, uri) in [
        ("globex", "az://box/x?credential=az"),
        ("acme", "gs://out/x?credential=az"),
    ] {
        let error = rules.check(tenant, uri, None).unwrap_err();
        assert!(
            matches!(
                error,
                DestinationError::UnknownCredential { .. } | DestinationError::NoCredentials { .. }
            ),
            "{tenant} {uri}: {error}"
        );
    }
    // A job's own endpoints go through the address guard: given on their
    // own, or inside the service account's key.
    let private = "http://169.254.169.254";
    for own in [
        secrets(&[
            (secret_keys::GCS_SERVICE_ACCOUNT_KEY, &gcs_key(None)),
            (secret_keys::GCS_BASE_URL, private),
        ]),
        secrets(&[(
            secret_keys::GCS_SERVICE_ACCOUNT_KEY,
            &gcs_key(Some(private)),
        )]),
    ] {
        assert!(matches!(
            rules.check("acme", "gs://out/x", Some(&own)),
            Err(DestinationError::Endpoint { .. })
        ));
    }
    let mut own = azure.clone();
    own.values
        .insert(secret_keys::AZURE_ENDPOINT.into(), private.into());
    assert!(matches!(
        rules.check("acme", "az://box/x", Some(&own)),
        Err(DestinationError::Endpoint { .. })
    ));
    assert!(matches!(
        rules.check("acme", "gs://out/../x", Some(&google)),
        Err(DestinationError::ParentDir { .. })
    ));
}

#[test]
fn only_buckets_without_a_fleet_credential_use_their_jobs_keys() {
    for uri in ["s3://b/p", "gs://b", "az://c/p", "azure://c/p"] {
        assert!(uses_job_keys(uri), "{uri}");
    }
    for uri in [
        "s3://b/p?credential=fleet",
        "gs://b?credential=fleet",
        "az://c/p?credential=fleet",
        "file:///srv/out",
        "/srv/out",
        "hf://org/repo",
        "s3://b/p?other=1",
    ] {
        assert!(!uses_job_keys(uri), "{uri}");
    }
}
