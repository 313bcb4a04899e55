//! Tests of the config reader: valid files, and each class of bad input with its exact message.

mod valid {
    use crate::config::*;

    fn env() -> Environment {
        Environment {
            hostname: "testhost".into(),
            read_file: |p| {
                Err(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    p.to_string(),
                ))
            },
        }
    }

    #[test]
    fn the_annotated_example_parses() {
        let src = include_str!("../../../../examples/portico.yaml");
        let cfg = parse(src, &env()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg.services.len(), 2);
        assert_eq!(cfg.cluster.peers.len(), 2);
        assert_eq!(cfg.services[1].ports[1].protocol, Protocol::Udp);
    }

    #[test]
    fn the_embedded_default_parses() {
        let cfg = parse(EMBEDDED_DEFAULT, &env()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg.node.name, "local");
    }

    #[test]
    fn the_effective_config_reads_back_as_the_same_config() {
        // `portico check` prints the effective config; it must be valid input meaning the same.
        // Cluster keys are never printed, so they are put back before reading it again.
        let mut sources = vec![
            EMBEDDED_DEFAULT.to_string(),
            include_str!("../../../../examples/portico.yaml").to_string(),
        ];
        sources.push(
            "services:\n  - name: x\n    vips: [10.0.0.1]\n    ports: [{port: 1}]\n    backends: [{address: 10.0.1.1}]\n    health_check: {type: none}\n".into(),
        );
        for src in sources {
            let cfg = parse(&src, &env()).unwrap_or_else(|e| panic!("{e}"));
            let mut printed = to_yaml(&cfg);
            if !cfg.cluster.keys.is_empty() {
                printed = printed.replace(
                    "\ncluster:\n",
                    "\ncluster:\n  keys: [{id: 1, secret: q83vEjRWeJq83vEjRWeJq83vEjRWeJq83vEjRWeJq80=}]\n",
                );
            }
            let again = parse(&printed, &env()).unwrap_or_else(|e| panic!("{e}\n{printed}"));
            assert_eq!(cfg, again, "{printed}");
        }
    }

    #[test]
    fn an_empty_file_is_a_valid_empty_config_with_defaults() {
        let cfg = parse("", &env()).unwrap();
        assert_eq!(cfg.node.name, "testhost");
        assert_eq!(cfg.admin.listen, "127.0.0.1:9440".parse().unwrap());
        assert!(cfg.services.is_empty());
    }
}

mod bad_input {
    //! Each class of bad input and the exact message it produces.
    use crate::config::*;

    const SVC: &str = "services:\n  - name: web\n    vips: [10.0.0.1]\n    ports: [{port: 80}]\n    backends: [{address: 10.0.1.1}]\n";

    fn errors(src: &str) -> Vec<String> {
        match parse(src, &Environment::default()) {
            Ok(_) => panic!("accepted:\n{src}"),
            Err(e) => e.0.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn each_class_of_bad_input_has_its_exact_message() {
        let cases: &[(&str, &str)] = &[
            (
                "services:\n  - name: web\n    vips: [10.0.0.1]\n    ports:\n      - port: 70000\n    backends: [{address: 10.0.1.1}]\n",
                "services[0].ports[0].port: 70000 is out of range 1-65535 (line 5, column 15)",
            ),
            (
                "admin:\n  listen: 127.0.0.1:9440\n  lisen: x\n",
                "admin.lisen: unknown field `lisen` (did you mean `listen`?); valid fields here: listen (line 3, column 3)",
            ),
            (
                "services:\n  - name: Web_1\n    vips: [10.0.0.1]\n    ports: [{port: 80}]\n    backends: [{address: 10.0.1.1}]\n",
                "services[0].name: `Web_1` is not a valid name; use 1-63 lower-case letters, digits and `-`, not at either end (line 2, column 11)",
            ),
            (
                "services:\n  - name: web\n    vips: [10.0.0.300]\n    ports: [{port: 80}]\n    backends: [{address: 10.0.1.1}]\n",
                "services[0].vips[0]: `10.0.0.300` is not an IP address; write e.g. 10.0.0.10 or fd00::10 (line 3, column 12)",
            ),
            (
                "services:\n  - name: web\n    vips: [10.0.0.1]\n    ports: [{port: 80, protocol: sctp}]\n    backends: [{address: 10.0.1.1}]\n",
                "services[0].ports[0].protocol: `sctp` is not valid (did you mean `tcp`?); use one of tcp, udp (line 4, column 34)",
            ),
            (
                "services:\n  - name: web\n    vips: [10.0.0.1]\n    ports: [{port: 80}]\n    backends: [{address: 10.0.1.1}]\n    health_check: {interval: 2 s}\n",
                "services[0].health_check.interval: unknown unit ` s` in `2 s`; use ns, us, ms, s, m or h (line 6, column 30)",
            ),
            (
                "services:\n  - name: web\n    vips: [10.0.0.1]\n    ports: [{port: 80}]\n    backends: [{address: 10.0.1.1}]\n    balance: maglevv\n",
                "services[0].balance: `maglevv` is not valid (did you mean `maglev`?); use one of round-robin, least-connections, power-of-two, maglev (line 6, column 14)",
            ),
            (
                "services:\n  - name: web\n    ports: [{port: 80}]\n    backends: [{address: 10.0.1.1}]\n",
                "services[0].vips: missing required field (line 2, column 5)",
            ),
            (
                "services: {name: web}\n",
                "services: expected a list, found a mapping (line 1, column 11)",
            ),
            ("admin: [1, 2\n", "YAML syntax error"),
            (
                "services:\n  - name: web\n    vips: [10.0.0.1]\n    ports: [{port: 80}]\n    backends: [{address: 10.0.1.1}]\n    health_check: {interval: 99999999999999999999999h}\n",
                "services[0].health_check.interval: `99999999999999999999999h` is too long a duration; write e.g. 30s, 5m or 1h (line 6, column 30)",
            ),
            (
                "cluster: {hold_down: 10000000000000000000s10000000000000000000s}\n",
                "cluster.hold_down: `10000000000000000000s10000000000000000000s` is too long a duration; write e.g. 30s, 5m or 1h (line 1, column 22)",
            ),
            (
                "cluster: {announce: {interval: 99999999999999999999999999999999999999999.5ms}}\n",
                "cluster.announce.interval: `99999999999999999999999999999999999999999.5ms` is too long a duration",
            ),
            (
                "cluster: {hold_down: 2h}\n",
                "cluster.hold_down: 2h is out of range 0s-1h (line 1, column 22)",
            ),
            (
                "services:\n  - name: web\n    vips: [10.0.0.1]\n    ports: [{port: 80}]\n    backends: [{address: 10.0.1.1}]\n    forwarding: kernal\n",
                "services[0].forwarding: `kernal` is not valid (did you mean `kernel`?); use one of auto, kernel, proxy",
            ),
            (
                "services:\n  - name: web\n    vips: [10.0.0.1]\n    ports: [{port: 80}]\n    backends: [{address: 10.0.1.1}]\n    forwarding: kernel\n    proxy_protocol: v2\n",
                "services[0].forwarding: forwarding: kernel cannot serve this service: it sends PROXY protocol (proxy_protocol); use forwarding: proxy or auto",
            ),
            (
                "services:\n  - name: web\n    vips: [10.0.0.1]\n    ports: [{port: 80}]\n    backends: [{address: 10.0.1.1}]\n    forwarding: proxy\n    keep_client_address: true\n",
                "services[0].keep_client_address: keep_client_address applies to the kernel path only",
            ),
        ];
        for (src, want) in cases {
            let got = errors(src);
            assert!(
                got.iter().any(|g| g.starts_with(want)),
                "for input:\n{src}\nwant: {want}\ngot:  {got:#?}"
            );
        }
    }

    #[test]
    fn every_error_is_reported_at_once() {
        let src = "admin:\n  listen: nope\nservices:\n  - name: web\n    vips: [10.0.0.1]\n    ports: [{port: 0}, {port: 99999}]\n    backends: [{address: 10.0.1.1, weight: 5000}]\n    typo: 1\n";
        let got = errors(src);
        assert_eq!(got.len(), 5, "{got:#?}");
        assert!(got[0].starts_with("admin.listen: `nope` is not an address:port"));
        assert!(got[1].starts_with("services[0].ports[0].port: 0 is out of range 1-65535"));
        assert!(got[2].starts_with("services[0].ports[1].port: 99999 is out of range 1-65535"));
        assert!(got[3].starts_with("services[0].backends[0].weight: 5000 is out of range 0-1000"));
        assert!(got[4].starts_with("services[0].typo: unknown field `typo`"));
    }

    #[test]
    fn cross_field_mistakes_are_caught() {
        let two = format!(
            "{SVC}  - name: api\n    vips: [10.0.0.1]\n    ports: [{{port: 80}}]\n    backends: [{{address: 10.0.1.2}}]\n"
        );
        let got = errors(&two);
        assert!(
            got.iter().any(|e| e.starts_with(
                "services[1].ports[0]: 10.0.0.1:80 80/tcp is already used by services[0].ports[0]"
            )),
            "{got:#?}"
        );

        let looped = SVC.replace(
            "backends: [{address: 10.0.1.1}]",
            "backends: [{address: 10.0.0.1}]",
        );
        let got = errors(&looped);
        assert!(
            got.iter().any(|e| e.starts_with(
                "services[0].backends[0].address: 10.0.0.1 is a VIP of service `web`"
            )),
            "{got:#?}"
        );

        let v6 = format!(
            "node:\n  name: a\n  interfaces: [{{name: eth0, addresses: [10.0.0.11/24]}}]\n{}",
            SVC.replace("vips: [10.0.0.1]", "vips: [10.0.0.1, fd00::1]")
        );
        let got = errors(&v6);
        assert!(got.iter().any(|e| e.starts_with("services[0].vips[1]: fd00::1 is IPv6 but no interface in node.interfaces (eth0) has an IPv6 address")), "{got:#?}");

        let dup = format!(
            "{SVC}  - name: web\n    vips: [10.0.0.2]\n    ports: [{{port: 80}}]\n    backends: [{{address: 10.0.1.2}}]\n"
        );
        let got = errors(&dup);
        assert!(
            got.iter().any(|e| e
                .starts_with("services[1].name: service `web` is already defined at services[0]")),
            "{got:#?}"
        );

        let peers = "node: {name: a, interfaces: [{name: eth0, addresses: [10.0.0.11/24]}]}\ncluster:\n  bind: 10.0.0.11:7946\n  peers: [{name: b, address: 10.0.0.12:7946}]\n";
        let got = errors(peers);
        assert!(
            got.iter()
                .any(|e| e.starts_with("cluster.keys: gossip with peers needs a shared key")),
            "{got:#?}"
        );

        let unknown_node = SVC.replace(
            "backends: [{address: 10.0.1.1}]",
            "backends: [{address: 10.0.1.1}]\n    placement: {preferred: [zzz]}",
        );
        let got = errors(&unknown_node);
        assert!(
            got.iter()
                .any(|e| e.starts_with("services[0].placement.preferred: unknown node `zzz`")),
            "{got:#?}"
        );

        let udp_check = SVC.replace(
            "ports: [{port: 80}]",
            "ports: [{port: 53, protocol: udp}]\n    health_check: {type: tcp}",
        );
        let got = errors(&udp_check);
        assert!(
            got.iter().any(|e| e.starts_with(
                "services[0].health_check.port: health checks speak TCP and this service has only UDP ports"
            )),
            "{got:#?}"
        );
        let udp_only = SVC.replace("ports: [{port: 80}]", "ports: [{port: 53, protocol: udp}]");
        let cfg = parse(&udp_only, &Environment::default()).unwrap();
        assert_eq!(
            cfg.services[0].health_check, None,
            "UDP-only services get no TCP probes"
        );
    }

    #[test]
    fn cross_field_errors_come_with_single_field_errors() {
        // a duplicate service name and an out-of-range port: both, at once
        let src = format!(
            "{SVC}  - name: web\n    vips: [10.0.0.2]\n    ports: [{{port: 70000}}]\n    backends: [{{address: 10.0.1.2}}]\n"
        );
        let got = errors(&src);
        assert_eq!(got.len(), 2, "{got:#?}");
        assert!(
            got[0].starts_with("services[1].name: service `web` is already defined at services[0]"),
            "{got:#?}"
        );
        assert!(
            got[1].starts_with("services[1].ports[0].port: 70000 is out of range"),
            "{got:#?}"
        );
    }

    #[test]
    fn cross_field_errors_name_the_files_items_when_earlier_ones_failed() {
        // services[0] has no name, so the config holds only the file's items 1 and 2
        let src = "services:\n  - vips: [10.0.0.9]\n    ports: [{port: 80}]\n    backends: [{address: 10.0.1.9}]\n  - name: web\n    vips: [10.0.0.1, bad, 10.0.0.1]\n    ports: [{port: 80}]\n    backends: [{address: 10.0.1.1}]\n  - name: web\n    vips: [10.0.0.2]\n    ports: [{port: 80}]\n    backends: [{address: 10.0.1.2}]\n";
        let got = errors(src);
        assert_eq!(
            got,
            [
                "services[0].name: missing required field (line 2, column 5)",
                "services[1].vips[1]: `bad` is not an IP address; write e.g. 10.0.0.10 or fd00::10 (line 6, column 22)",
                "services[1].vips[2]: 10.0.0.1 is listed twice (line 6, column 27)",
                "services[2].name: service `web` is already defined at services[1]; names must be unique (line 9, column 5)",
            ],
        );
    }

    #[test]
    fn a_field_with_an_error_is_not_reported_again_by_a_cross_field_check() {
        // every VIP is invalid: no extra "needs at least one VIP"; an invalid peer: no
        // "unknown node" for the backend that names it
        let src = "node: {name: a, interfaces: [{name: eth0, addresses: [10.0.0.11/24]}]}\ncluster:\n  advertise: 10.0.0.11:7946\n  keys: [{id: 1, secret: q83vEjRWeJq83vEjRWeJq83vEjRWeJq83vEjRWeJq80=}]\n  peers: [{name: b, address: nope}]\nservices:\n  - name: web\n    vips: [nope]\n    ports: [{port: 80}]\n    backends: [{address: 10.0.1.1, node: b}]\n";
        let got = errors(src);
        assert_eq!(got.len(), 2, "{got:#?}");
        assert!(
            got[0].starts_with("cluster.peers[0].address: `nope`"),
            "{got:#?}"
        );
        assert!(
            got[1].starts_with("services[0].vips[0]: `nope`"),
            "{got:#?}"
        );
    }

    #[test]
    fn text_that_is_not_utf8_is_an_error_at_its_position() {
        let e = read(
            b"admin:\n  listen: caf\xc3\xa9\xff\n",
            &Environment::default(),
        )
        .unwrap_err();
        assert_eq!(
            e.0.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["the file is not UTF-8 text (byte 0xff); save it as UTF-8 (line 2, column 15)"]
        );
        let e = read(b"\x80", &Environment::default()).unwrap_err();
        assert_eq!(e.0[0].pos, Pos { line: 1, column: 1 });
    }

    #[test]
    fn only_a_written_services_list_declares_the_services() {
        let declares = |src: &str| {
            read(src.as_bytes(), &Environment::default())
                .unwrap()
                .declares_services
        };
        assert!(!declares(""));
        assert!(!declares("# nothing here\n\n"));
        assert!(!declares("services:\n"));
        assert!(!declares("admin: {listen: 127.0.0.1:1}\n"));
        assert!(declares("services: []\n"));
        assert!(declares(SVC));
    }

    #[test]
    fn only_regular_files_of_bounded_size_are_read() {
        let dir = std::env::temp_dir().join(format!("portico-model-read-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let p = |name: &str| dir.join(name).to_string_lossy().into_owned();

        let err = |path: &str| read_file(path).unwrap_err().to_string();
        assert_eq!(
            err("/dev/zero"),
            "config file /dev/zero is not a regular file (it is a character device); give the path of a YAML file"
        );
        assert!(err(&p("")).contains("(it is a directory)"));
        let fifo = p("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        if made.is_ok_and(|s| s.success()) {
            // returns at once (a FIFO without a writer would block an open for reading)
            assert!(err(&fifo).contains("(it is a FIFO)"));
        } else if std::env::var_os("PORTICO_CI").is_some() {
            panic!("needs mkfifo (coreutils)");
        } else {
            eprintln!("skipped the FIFO case: needs mkfifo");
        }
        let big = p("big.yaml");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(MAX_FILE_SIZE + 1)
            .unwrap();
        assert!(
            err(&big).contains("is larger than 16 MiB (16777217 bytes)"),
            "{}",
            err(&big)
        );
        // a secret_file is read the same way
        let got = errors("cluster: {keys: [{id: 1, secret_file: /dev/zero}]}\n");
        assert_eq!(
            got,
            [
                "cluster.keys[0].secret_file: cannot read `/dev/zero`: not a regular file (it is a character device) (line 1, column 39)"
            ]
        );
        let ok = p("ok.yaml");
        std::fs::write(&ok, "services: []\n").unwrap();
        assert_eq!(read_file(&ok).unwrap(), b"services: []\n");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn duplicate_keys_are_errors() {
        let got = errors("admin:\n  listen: 127.0.0.1:1\n  listen: 127.0.0.1:2\n");
        assert_eq!(
            got,
            vec!["admin.listen: duplicate key; each field may appear once (line 3, column 3)"]
        );
    }

    #[test]
    fn secrets_accept_base64_and_hex_only_of_32_bytes() {
        assert!(decode_secret("q83vEjRWeJq83vEjRWeJq83vEjRWeJq83vEjRWeJq80=").is_some());
        assert!(decode_secret(&"ab".repeat(32)).is_some());
        assert!(decode_secret("c2hvcnQ=").is_none());
    }
}

mod mysql_login_and_shutdown {
    //! The MySQL check's optional login (password file) and `shutdown.drain_timeout`.
    use crate::config::*;
    use std::os::unix::fs::PermissionsExt as _;

    const SVC: &str = "services:\n  - name: db\n    vips: [10.0.0.1]\n    ports: [{port: 3306}]\n    backends: [{address: 10.0.1.1}]\n";

    struct TempFile(std::path::PathBuf);
    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    fn temp(name: &str, text: &str, mode: u32) -> TempFile {
        let p = std::env::temp_dir().join(format!("portico-model-{}-{name}", std::process::id()));
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        TempFile(p)
    }
    fn with_check(check: &str) -> String {
        format!("{SVC}    health_check: {check}\n")
    }
    fn errors(src: &str) -> Vec<String> {
        match parse(src, &Environment::default()) {
            Ok(_) => panic!("accepted:\n{src}"),
            Err(e) => e.0.iter().map(|e| e.message.clone()).collect(),
        }
    }

    #[test]
    fn the_default_mysql_check_does_not_log_in() {
        let cfg = parse(&with_check("{type: mysql}"), &Environment::default()).unwrap();
        let hc = cfg.services[0].health_check.as_ref().unwrap();
        assert_eq!(hc.kind, CheckKind::MYSQL);
    }

    #[test]
    fn a_password_file_is_read_without_its_line_break_and_never_printed() {
        let f = temp("pw", "s3cret-pw\n", 0o600);
        let src = with_check(&format!(
            "{{type: mysql, user: check, password_file: {}}}",
            f.0.display()
        ));
        let cfg = parse(&src, &Environment::default()).unwrap_or_else(|e| panic!("{e}"));
        let hc = cfg.services[0].health_check.as_ref().unwrap();
        match &hc.kind {
            CheckKind::Mysql { user, password, .. } => {
                assert_eq!(user.as_deref(), Some("check"));
                assert_eq!(password.as_ref().unwrap().0, "s3cret-pw");
            }
            other => panic!("{other:?}"),
        }
        let printed = to_yaml(&cfg);
        assert!(!printed.contains("s3cret"), "{printed}");
        assert!(!format!("{cfg:?}").contains("s3cret"));
        assert!(printed.contains("password_file"), "{printed}");
        // the printed config reads back as the same config (the file is read again)
        assert_eq!(parse(&printed, &Environment::default()).unwrap(), cfg);
    }

    #[test]
    fn a_world_readable_password_file_is_refused() {
        let f = temp("open", "pw\n", 0o644);
        let path = f.0.display().to_string();
        let got = errors(&with_check(&format!(
            "{{type: mysql, user: check, password_file: {path}}}"
        )));
        assert_eq!(
            got,
            vec![format!(
                "`{path}` is readable by every user (mode 644); make it private: chmod o-rwx {path}"
            )]
        );
    }

    #[test]
    fn login_fields_belong_to_mysql_and_password_file_needs_user() {
        assert_eq!(
            errors(&with_check("{type: tcp, user: check}")),
            vec!["user and password_file apply to type: mysql only, not type: tcp"]
        );
        let f = temp("nouser", "pw\n", 0o600);
        assert_eq!(
            errors(&with_check(&format!(
                "{{type: mysql, password_file: {}}}",
                f.0.display()
            ))),
            vec!["password_file needs user (the login is off without it)"]
        );
        let missing = errors(&with_check(
            "{type: mysql, user: check, password_file: /nonexistent/pw}",
        ));
        assert_eq!(missing.len(), 1);
        assert!(
            missing[0].starts_with("cannot read `/nonexistent/pw`"),
            "{missing:?}"
        );
    }

    #[test]
    fn shutdown_drain_timeout_defaults_to_30s_and_is_read() {
        let cfg = parse("", &Environment::default()).unwrap();
        assert_eq!(
            cfg.shutdown.drain_timeout,
            std::time::Duration::from_secs(30)
        );
        let cfg = parse("shutdown: {drain_timeout: 2s}\n", &Environment::default()).unwrap();
        assert_eq!(
            cfg.shutdown.drain_timeout,
            std::time::Duration::from_secs(2)
        );
        let got = errors("shutdown: {drain_timeout: 2h}\n");
        assert_eq!(got.len(), 1);
        assert!(got[0].contains("out of range"), "{got:?}");
    }

    #[test]
    fn proxy_workers_default_one_per_cpu_and_zero_is_refused_naming_the_field() {
        let cfg = parse("", &Environment::default()).unwrap();
        assert_eq!(cfg.proxy.workers, None);
        let cfg = parse("proxy: {workers: 2}\n", &Environment::default()).unwrap();
        assert_eq!(cfg.proxy.workers, Some(2));
        let got = errors("proxy: {workers: 0}\n");
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(
            got[0].contains("`proxy.workers`") && got[0].contains("set 1 or more"),
            "{got:?}"
        );
        let got = errors("proxy: {workers: 1000}\n");
        assert!(got[0].contains("out of range"), "{got:?}");
        let got = errors("proxy: {threads: 2}\n");
        assert_eq!(got.len(), 1, "{got:?}");
    }

    #[test]
    fn proxy_io_defaults_to_uring_and_a_typo_names_the_field_and_the_choices() {
        let cfg = parse("", &Environment::default()).unwrap();
        assert_eq!(cfg.proxy.io, crate::ProxyIo::Uring);
        let cfg = parse("proxy: {io: epoll}\n", &Environment::default()).unwrap();
        assert_eq!(cfg.proxy.io, crate::ProxyIo::Epoll);
        let got = parse("proxy: {io: io_uring}\n", &Environment::default())
            .unwrap_err()
            .0;
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(
            got[0].to_string(),
            "proxy.io: `io_uring` is not valid; use one of epoll, uring (line 1, column 13)"
        );
    }
}

mod forwarding {
    //! Which path a service runs on, and why.
    use crate::KernelSupport;
    use crate::config::*;

    fn service(extra: &str) -> Service {
        let src = format!(
            "services:\n  - name: web\n    vips: [10.0.0.1]\n    ports: [{{port: 80}}]\n    backends: [{{address: 10.0.1.1}}]\n{extra}"
        );
        let cfg = parse(&src, &Environment::default()).unwrap_or_else(|e| panic!("{e}"));
        cfg.services[0].clone()
    }

    #[test]
    fn auto_is_the_kernel_unless_the_proxy_is_needed() {
        assert_eq!(service("").forwarding, Forwarding::Auto);
        assert_eq!(service("").path(true), (Path::Kernel, "auto"));
        assert_eq!(service("").path(false), (Path::Proxy, "kernelUnavailable"));
        let cases = [
            ("    proxy_protocol: v1\n", "proxyProtocol"),
            ("    health_check: {type: mysql}\n", "mysqlRetry"),
            (
                "    circuit_breaker: {max_connections: 10}\n",
                "connectionLimits",
            ),
            ("    balance: least-connections\n", "connectionAware"),
        ];
        for (extra, why) in cases {
            assert_eq!(service(extra).path(true), (Path::Proxy, why), "{extra}");
        }
        // a MySQL service without connect retries has nothing the kernel cannot do
        let no_retry = service("    health_check: {type: mysql}\n    connection: {retries: 0}\n");
        assert_eq!(no_retry.path(true), (Path::Kernel, "auto"));
        let mut lo = service("");
        lo.vips = vec!["127.0.0.10".parse().unwrap()];
        assert_eq!(lo.path(true), (Path::Proxy, "loopback"));
    }

    #[test]
    fn an_explicit_choice_is_kept() {
        let k = service("    forwarding: kernel\n    keep_client_address: true\n");
        assert!(k.keep_client_address);
        assert_eq!(k.path(true), (Path::Kernel, "configured"));
        assert_eq!(k.path(false), (Path::Proxy, "kernelUnavailable"));
        let p = service("    forwarding: proxy\n");
        assert_eq!(p.path(true), (Path::Proxy, "configured"));
    }

    #[test]
    fn ipv6_vips_leave_the_kernel_path_when_the_node_does_not_forward_ipv6() {
        let v4_only = KernelSupport {
            available: true,
            ipv6: false,
        };
        // IPv4 services keep the kernel path
        assert_eq!(service("").path(v4_only), (Path::Kernel, "auto"));
        for forwarding in ["auto", "kernel"] {
            let mut s = service(&format!("    forwarding: {forwarding}\n"));
            s.vips.push("2001:db8::10".parse().unwrap());
            assert_eq!(
                s.path(v4_only),
                (Path::Proxy, "ipv6ForwardingOff"),
                "{forwarding}"
            );
            assert_ne!(s.path(true).0, Path::Proxy, "{forwarding}");
            assert_eq!(s.path(false), (Path::Proxy, "kernelUnavailable"));
        }
        // what only the proxy does is named first, as without IPv6
        let mut pp = service("    proxy_protocol: v1\n");
        pp.vips.push("2001:db8::10".parse().unwrap());
        assert_eq!(pp.path(v4_only), (Path::Proxy, "proxyProtocol"));
    }
}
