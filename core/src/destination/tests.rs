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
