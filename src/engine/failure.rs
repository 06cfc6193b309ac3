//! Why a record could not be processed: the failure a DLQ record carries. Its own file so that
//! `pipeline` (which produces failures) and `output` (which writes them) share it without
//! importing each other.

/// Where in the processing of a record a failure happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    Decode,
    Version,
    State,
    Rule,
    Output,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Decode => "decode",
            Stage::Version => "version",
            Stage::State => "state",
            Stage::Rule => "rule",
            Stage::Output => "output",
        }
    }
}

/// Why one record could not be processed; it becomes a DLQ record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordFailure {
    pub stage: Stage,
    pub reason: &'static str,
    pub message: String,
}

/// The DLQ reason of a record whose processing panicked.
pub const INTERNAL_ERROR: &str = "internal_error";

impl RecordFailure {
    /// The failure of a record whose processing panicked at `stage` (a bug in a decoder or a
    /// rule function): the record goes to the DLQ with the panic's message instead of
    /// stopping the partition on it forever.
    pub fn from_panic(stage: Stage, payload: &(dyn std::any::Any + Send)) -> RecordFailure {
        let message = payload
            .downcast_ref::<&str>()
            .map(|text| (*text).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".to_owned());
        RecordFailure {
            stage,
            reason: INTERNAL_ERROR,
            message: format!(
                "cdcflow panicked while processing this record ({} stage): {message}; this is a \
                 bug, please report it with this record",
                stage.as_str()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A panic's message (static or formatted) reaches the DLQ reason and message.
    #[test]
    fn panic_payloads_become_internal_errors() {
        let payload = std::panic::catch_unwind(|| panic!("index {} out of range", 7)).unwrap_err();
        let failure = RecordFailure::from_panic(Stage::Rule, payload.as_ref());
        assert_eq!(failure.reason, "internal_error");
        assert_eq!(failure.stage, Stage::Rule);
        assert!(
            failure.message.contains("index 7 out of range"),
            "{}",
            failure.message
        );
        let payload = std::panic::catch_unwind(|| panic!("static text")).unwrap_err();
        let failure = RecordFailure::from_panic(Stage::Decode, payload.as_ref());
        assert!(
            failure.message.contains("static text"),
            "{}",
            failure.message
        );
    }
}
