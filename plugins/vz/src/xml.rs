//! A small XML element tree, enough for ploop's `DiskDescriptor.xml`:
//! elements, text, the `<?xml ...?>` declaration and comments (skipped).
//! Attributes are kept but not interpreted; elements the driver does not
//! know (`Disk_Parameters`, `Blocksize`, ...) are kept as they were, so a
//! descriptor read and written back loses nothing the driver did not change.

/// One element: its name, attributes (raw), text and child elements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element {
    /// The tag name.
    pub name: String,
    /// Attributes as written, unparsed (`a="1" b="2"`), usually empty.
    pub attrs: String,
    /// The element's text (trimmed, entities decoded); empty for elements
    /// with children.
    pub text: String,
    /// Child elements, in order.
    pub children: Vec<Element>,
}

impl Element {
    /// An element with text and no children.
    pub fn text(name: &str, text: &str) -> Element {
        Element {
            name: name.to_string(),
            attrs: String::new(),
            text: text.to_string(),
            children: Vec::new(),
        }
    }

    /// An element with children.
    pub fn with(name: &str, children: Vec<Element>) -> Element {
        Element {
            name: name.to_string(),
            attrs: String::new(),
            text: String::new(),
            children,
        }
    }

    /// The first child named `name`.
    pub fn child(&self, name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.name == name)
    }

    /// The first child named `name`, mutable.
    pub fn child_mut(&mut self, name: &str) -> Option<&mut Element> {
        self.children.iter_mut().find(|c| c.name == name)
    }

    /// The text of the first child named `name`.
    pub fn child_text(&self, name: &str) -> Option<&str> {
        self.child(name).map(|c| c.text.as_str())
    }

    /// Every child named `name`.
    pub fn children_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Element> {
        self.children.iter().filter(move |c| c.name == name)
    }

    /// Parses a document: its root element.
    pub fn parse(input: &str) -> Result<Element, String> {
        let mut p = Parser { s: input, pos: 0 };
        p.skip_misc()?;
        let root = p.element()?;
        p.skip_misc()?;
        if p.pos != p.s.len() {
            return Err(format!(
                "unexpected content after the root element at byte {}",
                p.pos
            ));
        }
        Ok(root)
    }

    /// Writes the document (declaration, then the root element indented).
    pub fn to_document(&self) -> String {
        let mut out = String::from("<?xml version=\"1.0\"?>\n");
        self.write(&mut out, 0);
        out
    }

    fn write(&self, out: &mut String, depth: usize) {
        let indent = "  ".repeat(depth);
        out.push_str(&indent);
        out.push('<');
        out.push_str(&self.name);
        if !self.attrs.is_empty() {
            out.push(' ');
            out.push_str(&self.attrs);
        }
        if self.children.is_empty() {
            if self.text.is_empty() {
                out.push_str("/>\n");
            } else {
                out.push('>');
                out.push_str(&escape(&self.text));
                out.push_str("</");
                out.push_str(&self.name);
                out.push_str(">\n");
            }
            return;
        }
        out.push_str(">\n");
        for c in &self.children {
            c.write(out, depth + 1);
        }
        out.push_str(&indent);
        out.push_str("</");
        out.push_str(&self.name);
        out.push_str(">\n");
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn unescape(s: &str) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        let after = &rest[i..];
        let end = after
            .find(';')
            .ok_or_else(|| format!("unterminated entity in `{s}`"))?;
        out.push(match &after[..=end] {
            "&amp;" => '&',
            "&lt;" => '<',
            "&gt;" => '>',
            "&quot;" => '"',
            "&apos;" => '\'',
            other => return Err(format!("unknown entity {other}")),
        });
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

struct Parser<'a> {
    s: &'a str,
    pos: usize,
}

impl<'a> Parser<'a> {
    fn rest(&self) -> &'a str {
        &self.s[self.pos..]
    }

    fn skip_ws(&mut self) {
        let trimmed = self.rest().trim_start();
        self.pos = self.s.len() - trimmed.len();
    }

    /// Whitespace, comments and processing instructions.
    fn skip_misc(&mut self) -> Result<(), String> {
        loop {
            self.skip_ws();
            let (open, close) = if self.rest().starts_with("<?") {
                ("<?", "?>")
            } else if self.rest().starts_with("<!--") {
                ("<!--", "-->")
            } else {
                return Ok(());
            };
            let end = self
                .rest()
                .find(close)
                .ok_or_else(|| format!("unterminated {open} at byte {}", self.pos))?;
            self.pos += end + close.len();
        }
    }

    fn element(&mut self) -> Result<Element, String> {
        if !self.rest().starts_with('<') {
            return Err(format!("expected an element at byte {}", self.pos));
        }
        let end = self
            .rest()
            .find('>')
            .ok_or_else(|| format!("unterminated tag at byte {}", self.pos))?;
        let tag = &self.rest()[1..end];
        self.pos += end + 1;
        let (tag, empty) = match tag.strip_suffix('/') {
            Some(t) => (t, true),
            None => (tag, false),
        };
        let tag = tag.trim();
        let (name, attrs) = match tag.find(char::is_whitespace) {
            Some(i) => (&tag[..i], tag[i..].trim()),
            None => (tag, ""),
        };
        if name.is_empty() {
            return Err(format!("empty tag name before byte {}", self.pos));
        }
        let mut e = Element {
            name: name.to_string(),
            attrs: attrs.to_string(),
            text: String::new(),
            children: Vec::new(),
        };
        if empty {
            return Ok(e);
        }
        let mut text = String::new();
        loop {
            let next = self
                .rest()
                .find('<')
                .ok_or_else(|| format!("element <{name}> is not closed"))?;
            text.push_str(&self.rest()[..next]);
            self.pos += next;
            if self.rest().starts_with("</") {
                let close = self
                    .rest()
                    .find('>')
                    .ok_or_else(|| format!("unterminated closing tag of <{name}>"))?;
                let closing = self.rest()[2..close].trim();
                if closing != name {
                    return Err(format!("<{name}> closed by </{closing}>"));
                }
                self.pos += close + 1;
                break;
            } else if self.rest().starts_with("<!--") || self.rest().starts_with("<?") {
                self.skip_misc()?;
            } else {
                e.children.push(self.element()?);
            }
        }
        e.text = unescape(text.trim())?;
        Ok(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_writes_back_the_same_tree() {
        let doc = "<?xml version=\"1.0\"?>\n<!-- c -->\n<A x=\"1\"><B>t &amp; u</B><C/><D>\n <E>1</E></D></A>\n";
        let e = Element::parse(doc).unwrap();
        assert_eq!(e.name, "A");
        assert_eq!(e.attrs, "x=\"1\"");
        assert_eq!(e.child_text("B"), Some("t & u"));
        assert_eq!(e.child("D").unwrap().child_text("E"), Some("1"));
        let again = Element::parse(&e.to_document()).unwrap();
        assert_eq!(again, e);
    }

    #[test]
    fn rejects_broken_documents() {
        assert!(Element::parse("<A><B></A>").is_err());
        assert!(Element::parse("<A>").is_err());
        assert!(Element::parse("<A></A><B/>").is_err());
        assert!(Element::parse("<A>&bogus;</A>").is_err());
    }
}
