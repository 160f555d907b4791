//! Job files (`alexnet launch --config`, and the job the coordinator sends to workers) and
//! the `[net]` table as TOML: parsing, `validate()` and `hash()` never panic.
#![no_main]

use alexnet::model::NetConfig;
use alexnet::train::job::JobConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(job) = toml::from_str::<JobConfig>(text) {
        let valid = job.validate();
        let hash = job.hash();
        assert_eq!(hash.len(), 16);
        // The hash is a function of the configuration.
        assert_eq!(hash, job.clone().hash());
        if valid.is_ok() {
            let sides = job.net.validate().expect("validated with the job");
            let _ = job.net.fc6_inputs(&sides);
        }
    }
    if let Ok(net) = toml::from_str::<NetConfig>(text) {
        if let Ok(sides) = net.validate() {
            let _ = net.fc6_inputs(&sides);
        }
    }
});
