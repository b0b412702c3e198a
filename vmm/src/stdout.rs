//! The guest consoles' output: this process's stdout.

use std::io::Write;

/// Guest output goes straight to stdout, flushed per write so a console
/// prompt shows up without waiting for a newline.
pub struct StdoutWriter;

impl Write for StdoutWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut out = std::io::stdout().lock();
        out.write_all(buf)?;
        out.flush()?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().flush()
    }
}
