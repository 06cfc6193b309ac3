//! Pipelines chained through their topics (`format = "cloudevents"` reads another pipeline's
//! business events): a chain that would feed itself is refused at start-up, since its events
//! would cause one another without end.

use regex::Regex;

use super::model::PipelineConfig;
use super::{ConfigError, invalid};

/// Whether `pipeline` reads `topic` (its `topics`, or its `topic_pattern` as a whole match).
fn reads(pipeline: &PipelineConfig, topic: &str) -> bool {
    pipeline.topics.iter().any(|input| input == topic)
        || pipeline.topic_pattern.as_deref().is_some_and(|pattern| {
            Regex::new(&format!("^(?:{pattern})$")).is_ok_and(|regex| regex.is_match(topic))
        })
}

/// The topics a pipeline's rules write, each with the first rule that writes it.
fn outputs(pipeline: &PipelineConfig) -> Vec<&str> {
    let mut topics: Vec<&str> = pipeline
        .rules
        .iter()
        .map(|rule| rule.topic.as_str())
        .collect();
    topics.dedup();
    topics
}

/// Refuses a set of pipelines in which one's events reach its own input, directly or through
/// others; the message names the loop, pipeline by pipeline and topic by topic.
pub(super) fn reject_loops(pipelines: &[PipelineConfig]) -> Result<(), ConfigError> {
    // feeds[a] = (b, topic): a's rules write `topic`, which b reads.
    let feeds: Vec<Vec<(usize, &str)>> = pipelines
        .iter()
        .map(|from| {
            let mut edges = Vec::new();
            for topic in outputs(from) {
                for (to, reader) in pipelines.iter().enumerate() {
                    if reads(reader, topic) {
                        edges.push((to, topic));
                    }
                }
            }
            edges
        })
        .collect();
    for start in 0..pipelines.len() {
        // Depth-first from `start`, remembering the path: a way back to `start` is a loop.
        let mut path: Vec<(usize, &str)> = Vec::new();
        let mut stack: Vec<(usize, usize)> = vec![(start, 0)];
        let mut visited = vec![false; pipelines.len()];
        while let Some((node, next_edge)) = stack.pop() {
            if next_edge >= feeds[node].len() {
                path.pop();
                continue;
            }
            stack.push((node, next_edge + 1));
            let (to, topic) = feeds[node][next_edge];
            if to == start {
                path.push((to, topic));
                let mut names = vec![format!("`{}`", pipelines[start].name)];
                for (step, topic) in &path {
                    names.push(format!("(topic `{topic}`) `{}`", pipelines[*step].name));
                }
                return Err(invalid(
                    format!("pipeline[{start}]"),
                    format!(
                        "pipeline `{}` would feed itself: {}. A chain must not loop: write \
                         the events to a topic no earlier stage reads",
                        pipelines[start].name,
                        names.join(" -> ")
                    ),
                ));
            }
            if !visited[to] {
                visited[to] = true;
                path.push((to, topic));
                stack.push((to, 0));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipeline(name: &str, inputs: &[&str], outputs: &[&str]) -> PipelineConfig {
        let rules: String = outputs
            .iter()
            .enumerate()
            .map(|(index, topic)| {
                format!(
                    "[[rule]]\nname = \"r{index}\"\nwhen = \"true\"\nevent_type = \"T\"\n\
                     topic = \"{topic}\"\n"
                )
            })
            .collect();
        let text = format!("name = \"{name}\"\ntopics = {inputs:?}\n{rules}");
        toml::from_str(&text).unwrap()
    }

    #[test]
    fn a_straight_chain_is_accepted() {
        let chain = [
            pipeline("orders", &["db.orders"], &["orders.events"]),
            pipeline("shipping", &["orders.events"], &["shipping.events"]),
            pipeline("notify", &["shipping.events"], &["notify.events"]),
        ];
        assert!(reject_loops(&chain).is_ok());
    }

    #[test]
    fn a_loop_is_named_stage_by_stage() {
        let looped = [
            pipeline("orders", &["db.orders"], &["orders.events"]),
            pipeline(
                "shipping",
                &["orders.events", "notify.events"],
                &["shipping.events"],
            ),
            pipeline("notify", &["shipping.events"], &["notify.events"]),
        ];
        let error = reject_loops(&looped).unwrap_err().to_string();
        assert!(
            error.contains(
                "`shipping` -> (topic `shipping.events`) `notify` -> (topic `notify.events`) \
                 `shipping`"
            ),
            "{error}"
        );
    }

    #[test]
    fn a_pipeline_reading_its_own_output_through_a_pattern_is_refused() {
        let mut own = pipeline("audit", &[], &["audit.events"]);
        own.topic_pattern = Some("audit\\..*".to_owned());
        let error = reject_loops(&[own]).unwrap_err().to_string();
        assert!(error.contains("would feed itself"), "{error}");
    }
}
