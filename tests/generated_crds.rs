//! `crds/` and the chart's `crds/` must hold exactly what `mailauth-operator
//! crd` generates from the Rust types; run `make crds` after changing them.

use std::path::Path;

#[test]
fn committed_crds_are_fresh() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for dir in ["crds", "charts/mailauth-operator/crds"] {
        for crd in mailauth_operator::api::crds() {
            let path = root
                .join(dir)
                .join(mailauth_operator::api::crd_file_name(&crd));
            let committed = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e} (run `make crds`)", path.display()));
            let generated = mailauth_operator::api::crd_yaml(&crd).expect("rendering CRD");
            assert!(
                committed == generated,
                "{} is stale: run `make crds` and commit the result",
                path.display()
            );
        }
        let files = std::fs::read_dir(root.join(dir))
            .expect("listing CRD dir")
            .count();
        assert_eq!(
            files,
            mailauth_operator::api::crds().len(),
            "{dir} holds files that are not generated CRDs"
        );
    }
}
