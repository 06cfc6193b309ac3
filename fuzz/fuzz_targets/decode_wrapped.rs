//! Arbitrary bytes as the payload of a JsonConverter-wrapped record whose schema declares
//! every logical type cdcflow converts (decimals, dates, times, timestamps, JSON, nested
//! structs and arrays): the conversions must reject bad values with an error, never panic.
#![no_main]

use cdcflow::cdc::{Decoder, RawRecord};
use libfuzzer_sys::fuzz_target;
use std::sync::LazyLock;

const ROW: &str = r#"{"type":"struct","optional":true,"field":"%s","fields":[
 {"type":"int64","optional":false,"field":"id"},
 {"type":"bytes","optional":true,"name":"org.apache.kafka.connect.data.Decimal","parameters":{"scale":"2"},"field":"amount"},
 {"type":"struct","optional":true,"name":"io.debezium.data.VariableScaleDecimal","field":"ratio","fields":[{"type":"int32","field":"scale"},{"type":"bytes","field":"value"}]},
 {"type":"int32","optional":true,"name":"io.debezium.time.Date","field":"day"},
 {"type":"int64","optional":true,"name":"io.debezium.time.MicroTime","field":"at"},
 {"type":"int64","optional":true,"name":"io.debezium.time.MicroTimestamp","field":"created"},
 {"type":"int64","optional":true,"name":"io.debezium.time.NanoTimestamp","field":"nanos"},
 {"type":"int64","optional":true,"name":"org.apache.kafka.connect.data.Timestamp","field":"ts"},
 {"type":"string","optional":true,"name":"io.debezium.data.Json","field":"doc"},
 {"type":"array","optional":true,"items":{"type":"int32","optional":true,"name":"io.debezium.time.Date"},"field":"days"},
 {"type":"struct","optional":true,"field":"inner","fields":[{"type":"bytes","name":"org.apache.kafka.connect.data.Decimal","parameters":{"scale":"-3"},"field":"d"}]}
]}"#;

static SCHEMA: LazyLock<String> = LazyLock::new(|| {
    format!(
        r#"{{"type":"struct","optional":false,"name":"Envelope","fields":[{},{},{{"type":"struct","field":"source","fields":[]}},{{"type":"string","field":"op"}}]}}"#,
        ROW.replace("%s", "before"),
        ROW.replace("%s", "after")
    )
});

static DECODER: LazyLock<Decoder> = LazyLock::new(Decoder::default);

fuzz_target!(|data: &[u8]| {
    let mut value = format!(r#"{{"schema":{},"payload":"#, *SCHEMA).into_bytes();
    value.extend_from_slice(data);
    value.push(b'}');
    let record = RawRecord {
        topic: "t".into(),
        partition: 0,
        offset: 0,
        key: Some(
            br#"{"schema":{"type":"struct","fields":[{"type":"int64","field":"id"}]},"payload":{"id":1}}"#
                .to_vec(),
        ),
        value: Some(value),
        headers: Vec::new(),
        timestamp_ms: None,
    };
    let _ = DECODER.decode(&record);
});
