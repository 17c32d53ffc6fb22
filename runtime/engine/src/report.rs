//! One-line error reports for the command-line tools: an error and its causes joined by ": ",
//! skipping a cause whose text the report already carries (many errors print their source).

/// `error` and its chain of sources as one line, without repeats.
pub fn error_line(error: &(dyn std::error::Error + 'static)) -> String {
    let mut line = String::new();
    let mut next = Some(error);
    while let Some(e) = next {
        let text = e.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
        next = e.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("model.kiln: {source}")]
    struct Outer {
        source: std::io::Error,
    }

    #[test]
    fn a_source_already_in_the_message_is_not_repeated() {
        let e = Outer {
            source: std::io::Error::other("disk on fire"),
        };
        assert_eq!(error_line(&e), "model.kiln: disk on fire");
    }
}
