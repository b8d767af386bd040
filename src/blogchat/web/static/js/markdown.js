// Markdown to DOM, for the answer that is still streaming: the same reading as the server's
// final rendering (markdown-it "commonmark" + tables + strikethrough, raw HTML off, then nh3;
// src/blogchat/rendering.py), built with createElement and text nodes only. Nothing here ever
// parses model text as HTML, so the live answer is safe by construction: no element or
// attribute exists that the code below does not create, links keep only http(s), mailto and
// relative targets, and images become links, as on the server.
//
// The parser is a port of markdown-it's own rules (block: table, code, fence, blockquote, hr,
// list, reference, heading, lheading, paragraph; inline: text, newline, escape, backticks,
// strikethrough, emphasis, link, image, autolink, entity), so that the last live rendering and
// the final HTML are the same tree. tests/test_markdown.py compares the two on the blog's
// posts and on generated answers.

/** The `rel` every link that leaves the site carries (rendering.EXTERNAL_LINK_REL). */
export const EXTERNAL_LINK_REL = "nofollow noopener noreferrer";

const MAX_NESTING = 20;
const EXTERNAL_URL = /^(?:https?:)?\/\//i;
const CODE_CLASS = /^language-[A-Za-z0-9_+#.-]{1,40}$/;
const SAFE_SCHEMES = new Set(["http", "https", "mailto"]);

// --- characters ------------------------------------------------------------------------

const isSpace = (ch) => ch === " " || ch === "\t";
const MD_WHITESPACE = new Set([0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x20, 0xa0, 0x1680, 0x202f, 0x205f, 0x3000]);
const isWhiteSpace = (code) => (code >= 0x2000 && code <= 0x200a) || MD_WHITESPACE.has(code);
const PUNCT = /^[\p{P}\p{S}]$/u;
const isPunctChar = (ch) => PUNCT.test(ch);
const ASCII_PUNCT = new Set("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~");
const isMdAsciiPunct = (ch) => ASCII_PUNCT.has(ch);
const TRIM = "\t\n\v\f\r \u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000";
const TRIM_RUN = new RegExp(`[${TRIM}]+`, "g");

function mdTrim(text) {
  let start = 0;
  let end = text.length;
  while (start < end && TRIM.includes(text[start])) start += 1;
  while (end > start && TRIM.includes(text[end - 1])) end -= 1;
  return text.slice(start, end);
}

function normalizeReference(label) {
  return mdTrim(label).replace(TRIM_RUN, " ").toLowerCase().toUpperCase();
}

// The named references an answer is likely to use. markdown-it knows all of HTML's; one it
// does not know here stays as typed until the final rendering.
const ENTITIES = {
  amp: "&", lt: "<", gt: ">", quot: '"', apos: "'", nbsp: "\u00a0", copy: "©", reg: "®",
  trade: "™", hellip: "…", mdash: "—", ndash: "–", lsquo: "‘", rsquo: "’", ldquo: "“",
  rdquo: "”", laquo: "«", raquo: "»", middot: "·", bull: "•", times: "×", divide: "÷",
  deg: "°", plusmn: "±", euro: "€", pound: "£", yen: "¥", cent: "¢", sect: "§", para: "¶",
  larr: "←", rarr: "→", uarr: "↑", darr: "↓", harr: "↔", le: "≤", ge: "≥", ne: "≠",
  asymp: "≈", infin: "∞", minus: "−", shy: "\u00ad", thinsp: "\u2009", ensp: "\u2002",
  emsp: "\u2003", zwj: "\u200d", zwnj: "\u200c", check: "✓", star: "☆", hearts: "♥",
};

function isValidEntityCode(c) {
  if (c >= 0xd800 && c <= 0xdfff) return false;
  if (c >= 0xfdd0 && c <= 0xfdef) return false;
  if ((c & 0xffff) === 0xffff || (c & 0xffff) === 0xfffe) return false;
  if (c >= 0x00 && c <= 0x08) return false;
  if (c === 0x0b) return false;
  if (c >= 0x0e && c <= 0x1f) return false;
  if (c >= 0x7f && c <= 0x9f) return false;
  if (c > 0x10ffff) return false;
  return true;
}

function entityText(match, name) {
  if (Object.hasOwn(ENTITIES, name)) return ENTITIES[name];
  let code = null;
  let m = /^#([0-9]{1,8})$/.exec(name);
  if (m) code = parseInt(m[1], 10);
  else if ((m = /^#x([a-f0-9]{1,8})$/i.exec(name))) code = parseInt(m[1], 16);
  return code !== null && isValidEntityCode(code) ? String.fromCodePoint(code) : match;
}

const UNESCAPE_ALL = /\\([!"#$%&'()*+,\-./:;<=>?@[\\\]^_`{|}~])|&([a-z#][a-z0-9]{1,31});/gi;

function unescapeAll(text) {
  if (!text.includes("\\") && !text.includes("&")) return text;
  return text.replace(UNESCAPE_ALL, (match, escaped, entity) => escaped || entityText(match, entity));
}

// --- links: markdown-it's normalizeLink/validateLink, then what nh3 keeps ----------------

const URL_KEEP = /[A-Za-z0-9;/?:@&=+$,\-_.!~*'()#]/;

function encodeUrl(text) {
  let out = "";
  for (let i = 0; i < text.length; i += 1) {
    const ch = text[i];
    if (ch === "%" && /^[0-9a-f]{2}$/i.test(text.slice(i + 1, i + 3))) {
      out += text.slice(i, i + 3);
      i += 2;
    } else if (ch.charCodeAt(0) < 128) {
      out += URL_KEEP.test(ch) ? ch : `%${ch.charCodeAt(0).toString(16).toUpperCase().padStart(2, "0")}`;
    } else {
      const code = text.codePointAt(i);
      if (code > 0xffff) {
        out += encodeURIComponent(String.fromCodePoint(code));
        i += 1;
      } else if (code >= 0xd800 && code <= 0xdfff) {
        out += "%EF%BF%BD";
      } else {
        out += encodeURIComponent(ch);
      }
    }
  }
  return out;
}

// What Python's str.strip() removes (the server's URL parser trims with it).
const PY_SPACE = /^[\t-\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+|[\t-\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+$/g;

// markdown-it also turns international host names into punycode; a link to one differs
// between the live and the final rendering until the answer is done.
const normalizeLink = (url) => encodeUrl(url.replace(PY_SPACE, ""));

function normalizeLinkText(url) {
  // Percent-escapes read as text again, except those of characters that would change the URL.
  return url.replace(/(%[a-f0-9]{2})+/gi, (seq) => {
    try {
      const text = decodeURIComponent(seq);
      return /[;/?:@&=+$,#%]/.test(text) ? seq : text;
    } catch {
      return seq;
    }
  });
}

function validateLink(url) {
  const lowered = mdTrim(url).toLowerCase();
  if (/^(vbscript|javascript|file|data):/.test(lowered)) return /^data:image\/(gif|png|jpeg|webp);/.test(lowered);
  return true;
}

/** Whether nh3 keeps this link target: a relative one, or http(s) and mailto. */
export function keptUrl(url) {
  const scheme = /^([a-zA-Z][a-zA-Z0-9+.-]*):/.exec(url);
  return !scheme || SAFE_SCHEMES.has(scheme[1].toLowerCase());
}

// --- tokens ----------------------------------------------------------------------------

class Token {
  constructor(type, tag, nesting) {
    this.type = type;
    this.tag = tag;
    this.nesting = nesting;
    this.attrs = null;
    this.map = null;
    this.level = 0;
    this.children = null;
    this.content = "";
    this.markup = "";
    this.info = "";
    this.block = false;
    this.hidden = false;
  }

  attrSet(name, value) {
    if (!this.attrs) this.attrs = [];
    const found = this.attrs.find((a) => a[0] === name);
    if (found) found[1] = value;
    else this.attrs.push([name, value]);
  }

  attrGet(name) {
    return this.attrs?.find((a) => a[0] === name)?.[1] ?? null;
  }
}

// --- block parsing ---------------------------------------------------------------------

class BlockState {
  constructor(src, env, tokens) {
    this.src = src;
    this.env = env;
    this.tokens = tokens;
    this.bMarks = [];
    this.eMarks = [];
    this.tShift = [];
    this.sCount = [];
    this.bsCount = [];
    this.blkIndent = 0;
    this.line = 0;
    this.tight = false;
    this.listIndent = -1;
    this.parentType = "root";
    this.level = 0;
    const length = src.length;
    let start = 0;
    while (start < length) {
      let end = src.indexOf("\n", start);
      if (end < 0) end = length;
      let indent = 0;
      let offset = 0;
      let pos = start;
      while (pos < end && isSpace(src[pos])) {
        indent += 1;
        offset += src[pos] === "\t" ? 4 - (offset % 4) : 1;
        pos += 1;
      }
      if (pos === end && end === length) break; // a last line of only spaces: no line
      this.bMarks.push(start);
      this.eMarks.push(end);
      this.tShift.push(indent);
      this.sCount.push(offset);
      this.bsCount.push(0);
      start = end < length ? end + 1 : length;
    }
    this.bMarks.push(length);
    this.eMarks.push(length);
    this.tShift.push(0);
    this.sCount.push(0);
    this.bsCount.push(0);
    this.lineMax = this.bMarks.length - 1;
  }

  push(type, tag, nesting) {
    const token = new Token(type, tag, nesting);
    token.block = true;
    if (nesting < 0) this.level -= 1;
    token.level = this.level;
    if (nesting > 0) this.level += 1;
    this.tokens.push(token);
    return token;
  }

  isEmpty(line) {
    return this.bMarks[line] + this.tShift[line] >= this.eMarks[line];
  }

  skipEmptyLines(from) {
    while (from < this.lineMax && this.bMarks[from] + this.tShift[from] >= this.eMarks[from]) from += 1;
    return from;
  }

  skipSpaces(pos) {
    while (pos < this.src.length && isSpace(this.src[pos])) pos += 1;
    return pos;
  }

  skipSpacesBack(pos, min) {
    if (pos <= min) return pos;
    while (pos > min) if (!isSpace(this.src[--pos])) return pos + 1;
    return pos;
  }

  skipChars(pos, ch) {
    while (pos < this.src.length && this.src[pos] === ch) pos += 1;
    return pos;
  }

  skipCharsBack(pos, ch, min) {
    if (pos <= min) return pos;
    while (pos > min) if (ch !== this.src[--pos]) return pos + 1;
    return pos;
  }

  getLines(begin, end, indent, keepLastLF) {
    if (begin >= end) return "";
    const queue = [];
    for (let line = begin; line < end; line += 1) {
      let lineIndent = 0;
      const lineStart = this.bMarks[line];
      let first = lineStart;
      const last = line + 1 < end || keepLastLF ? this.eMarks[line] + 1 : this.eMarks[line];
      while (first < last && lineIndent < indent) {
        const ch = this.src[first];
        if (isSpace(ch)) {
          lineIndent += ch === "\t" ? 4 - ((lineIndent + this.bsCount[line]) % 4) : 1;
        } else if (first - lineStart < this.tShift[line]) {
          lineIndent += 1;
        } else {
          break;
        }
        first += 1;
      }
      queue.push((lineIndent > indent ? " ".repeat(lineIndent - indent) : "") + this.src.slice(first, last));
    }
    return queue.join("");
  }

  isCodeBlock(line) {
    return this.sCount[line] - this.blkIndent >= 4;
  }
}

function blockTokenize(state, startLine, endLine) {
  let line = startLine;
  let hasEmptyLines = false;
  while (line < endLine) {
    state.line = line = state.skipEmptyLines(line);
    if (line >= endLine) break;
    if (state.sCount[line] < state.blkIndent) break;
    if (state.level >= MAX_NESTING) {
      state.line = endLine;
      break;
    }
    for (const rule of BLOCK_RULES) {
      if (rule(state, line, endLine, false)) break;
    }
    state.tight = !hasEmptyLines;
    line = state.line;
    if (line - 1 < endLine && state.isEmpty(line - 1)) hasEmptyLines = true;
    if (line < endLine && state.isEmpty(line)) {
      hasEmptyLines = true;
      line += 1;
      state.line = line;
    }
  }
}

function terminates(rules, state, line, endLine) {
  return rules.some((rule) => rule(state, line, endLine, true));
}

function getLine(state, line) {
  return state.src.slice(state.bMarks[line] + state.tShift[line], state.eMarks[line]);
}

function escapedSplit(text) {
  const result = [];
  let pos = 0;
  let isEscaped = false;
  let lastPos = 0;
  let current = "";
  while (pos < text.length) {
    const ch = text[pos];
    if (ch === "|") {
      if (!isEscaped) {
        result.push(current + text.slice(lastPos, pos));
        current = "";
        lastPos = pos + 1;
      } else {
        current += text.slice(lastPos, pos - 1);
        lastPos = pos;
      }
    }
    isEscaped = ch === "\\";
    pos += 1;
  }
  result.push(current + text.slice(lastPos));
  return result;
}

function table(state, startLine, endLine, silent) {
  if (startLine + 2 > endLine) return false;
  let nextLine = startLine + 1;
  if (state.sCount[nextLine] < state.blkIndent) return false;
  if (state.isCodeBlock(nextLine)) return false;
  let pos = state.bMarks[nextLine] + state.tShift[nextLine];
  if (pos >= state.eMarks[nextLine]) return false;
  const first = state.src[pos++];
  if (first !== "|" && first !== "-" && first !== ":") return false;
  if (pos >= state.eMarks[nextLine]) return false;
  const second = state.src[pos++];
  if (second !== "|" && second !== "-" && second !== ":" && !isSpace(second)) return false;
  if (first === "-" && isSpace(second)) return false;
  while (pos < state.eMarks[nextLine]) {
    const ch = state.src[pos];
    if (ch !== "|" && ch !== "-" && ch !== ":" && !isSpace(ch)) return false;
    pos += 1;
  }
  let columns = getLine(state, startLine + 1).split("|");
  const aligns = [];
  for (let i = 0; i < columns.length; i += 1) {
    const t = mdTrim(columns[i]);
    if (!t) {
      if (i === 0 || i === columns.length - 1) continue;
      return false;
    }
    if (!/^:?-+:?$/.test(t)) return false;
    if (t.endsWith(":")) aligns.push(t.startsWith(":") ? "center" : "right");
    else if (t.startsWith(":")) aligns.push("left");
    else aligns.push("");
  }
  let lineText = mdTrim(getLine(state, startLine));
  if (!lineText.includes("|")) return false;
  if (state.isCodeBlock(startLine)) return false;
  columns = escapedSplit(lineText);
  if (columns.length && columns[0] === "") columns.shift();
  if (columns.length && columns.at(-1) === "") columns.pop();
  const columnCount = columns.length;
  if (columnCount === 0 || columnCount !== aligns.length) return false;
  if (silent) return true;
  const oldParentType = state.parentType;
  state.parentType = "table";
  const open = state.push("table_open", "table", 1);
  const tableLines = [startLine, 0];
  open.map = tableLines;
  state.push("thead_open", "thead", 1);
  state.push("tr_open", "tr", 1);
  for (let i = 0; i < columns.length; i += 1) {
    const th = state.push("th_open", "th", 1);
    if (aligns[i]) th.attrs = [["align", aligns[i]]];
    const inline = state.push("inline", "", 0);
    inline.content = mdTrim(columns[i]);
    inline.children = [];
    state.push("th_close", "th", -1);
  }
  state.push("tr_close", "tr", -1);
  state.push("thead_close", "thead", -1);
  let autocompleted = 0;
  let tbody = false;
  for (nextLine = startLine + 2; nextLine < endLine; nextLine += 1) {
    if (state.sCount[nextLine] < state.blkIndent) break;
    if (terminates(BLOCKQUOTE_TERMINATORS, state, nextLine, endLine)) break;
    lineText = mdTrim(getLine(state, nextLine));
    if (!lineText) break;
    if (state.isCodeBlock(nextLine)) break;
    columns = escapedSplit(lineText);
    if (columns.length && columns[0] === "") columns.shift();
    if (columns.length && columns.at(-1) === "") columns.pop();
    autocompleted += columnCount - columns.length;
    if (autocompleted > 0x10000) break;
    if (nextLine === startLine + 2) {
      state.push("tbody_open", "tbody", 1);
      tbody = true;
    }
    state.push("tr_open", "tr", 1);
    for (let i = 0; i < columnCount; i += 1) {
      const td = state.push("td_open", "td", 1);
      if (aligns[i]) td.attrs = [["align", aligns[i]]];
      const inline = state.push("inline", "", 0);
      inline.content = columns[i] ? mdTrim(columns[i]) : "";
      inline.children = [];
      state.push("td_close", "td", -1);
    }
    state.push("tr_close", "tr", -1);
  }
  if (tbody) state.push("tbody_close", "tbody", -1);
  state.push("table_close", "table", -1);
  tableLines[1] = nextLine;
  state.parentType = oldParentType;
  state.line = nextLine;
  return true;
}

function code(state, startLine, endLine) {
  if (!state.isCodeBlock(startLine)) return false;
  let last = startLine + 1;
  let nextLine = last;
  while (nextLine < endLine) {
    if (state.isEmpty(nextLine)) {
      nextLine += 1;
      continue;
    }
    if (state.isCodeBlock(nextLine)) {
      nextLine += 1;
      last = nextLine;
      continue;
    }
    break;
  }
  state.line = last;
  const token = state.push("code_block", "code", 0);
  token.content = `${state.getLines(startLine, last, 4 + state.blkIndent, false)}\n`;
  token.map = [startLine, state.line];
  return true;
}

function fence(state, startLine, endLine, silent) {
  let pos = state.bMarks[startLine] + state.tShift[startLine];
  let max = state.eMarks[startLine];
  if (state.isCodeBlock(startLine)) return false;
  if (pos + 3 > max) return false;
  const marker = state.src[pos];
  if (marker !== "~" && marker !== "`") return false;
  let mem = pos;
  pos = state.skipChars(pos, marker);
  let len = pos - mem;
  if (len < 3) return false;
  const markup = state.src.slice(mem, pos);
  const params = state.src.slice(pos, max);
  if (marker === "`" && params.includes("`")) return false;
  if (silent) return true;
  let nextLine = startLine;
  let haveEndMarker = false;
  for (;;) {
    nextLine += 1;
    if (nextLine >= endLine) break;
    pos = mem = state.bMarks[nextLine] + state.tShift[nextLine];
    max = state.eMarks[nextLine];
    if (pos < max && state.sCount[nextLine] < state.blkIndent) break;
    if (pos >= state.src.length) break;
    if (state.src[pos] !== marker) continue;
    if (state.isCodeBlock(nextLine)) continue;
    pos = state.skipChars(pos, marker);
    if (pos - mem < len) continue;
    pos = state.skipSpaces(pos);
    if (pos < max) continue;
    haveEndMarker = true;
    break;
  }
  len = state.sCount[startLine];
  state.line = nextLine + (haveEndMarker ? 1 : 0);
  const token = state.push("fence", "code", 0);
  token.info = params;
  token.content = state.getLines(startLine + 1, nextLine, len, true);
  token.markup = markup;
  token.map = [startLine, state.line];
  // Whether the closing fence has arrived: only then is the code final (and worth highlighting).
  token.closed = haveEndMarker;
  return true;
}

function blockquote(state, startLine, endLine, silent) {
  const oldLineMax = state.lineMax;
  let pos = state.bMarks[startLine] + state.tShift[startLine];
  let max = state.eMarks[startLine];
  if (state.isCodeBlock(startLine)) return false;
  if (state.src[pos] !== ">") return false;
  pos += 1;
  if (silent) return true;
  // Shared by the first line and the following ones: strip the marker and its space.
  const stripMarker = (line) => {
    let initial = state.sCount[line] + 1;
    let offset = initial;
    let adjustTab = false;
    let spaceAfterMarker = false;
    const next = state.src[pos];
    if (next === " ") {
      pos += 1;
      initial += 1;
      offset += 1;
      spaceAfterMarker = true;
    } else if (next === "\t") {
      spaceAfterMarker = true;
      if ((state.bsCount[line] + offset) % 4 === 3) {
        pos += 1;
        initial += 1;
        offset += 1;
      } else {
        adjustTab = true;
      }
    }
    saved.push([state.bMarks[line], state.tShift[line], state.sCount[line], state.bsCount[line]]);
    state.bMarks[line] = pos;
    while (pos < max) {
      const ch = state.src[pos];
      if (!isSpace(ch)) break;
      offset += ch === "\t" ? 4 - ((offset + state.bsCount[line] + (adjustTab ? 1 : 0)) % 4) : 1;
      pos += 1;
    }
    state.bsCount[line] = state.sCount[line] + 1 + (spaceAfterMarker ? 1 : 0);
    state.sCount[line] = offset - initial;
    state.tShift[line] = pos - state.bMarks[line];
    return pos >= max;
  };
  const saved = [];
  let lastLineEmpty = stripMarker(startLine);
  const oldParentType = state.parentType;
  state.parentType = "blockquote";
  let nextLine;
  for (nextLine = startLine + 1; nextLine < endLine; nextLine += 1) {
    const isOutdented = state.sCount[nextLine] < state.blkIndent;
    pos = state.bMarks[nextLine] + state.tShift[nextLine];
    max = state.eMarks[nextLine];
    if (pos >= max) break;
    if (state.src[pos] === ">" && !isOutdented) {
      pos += 1;
      lastLineEmpty = stripMarker(nextLine);
      continue;
    }
    if (lastLineEmpty) break;
    if (terminates(BLOCKQUOTE_TERMINATORS, state, nextLine, endLine)) {
      state.lineMax = nextLine;
      if (state.blkIndent !== 0) {
        saved.push([state.bMarks[nextLine], state.tShift[nextLine], state.sCount[nextLine], state.bsCount[nextLine]]);
        state.sCount[nextLine] -= state.blkIndent;
      }
      break;
    }
    saved.push([state.bMarks[nextLine], state.tShift[nextLine], state.sCount[nextLine], state.bsCount[nextLine]]);
    state.sCount[nextLine] = -1; // a lazy continuation line
  }
  const oldIndent = state.blkIndent;
  state.blkIndent = 0;
  const open = state.push("blockquote_open", "blockquote", 1);
  const lines = [startLine, 0];
  open.map = lines;
  blockTokenize(state, startLine, nextLine);
  state.push("blockquote_close", "blockquote", -1);
  state.lineMax = oldLineMax;
  state.parentType = oldParentType;
  lines[1] = state.line;
  saved.forEach(([bMark, tShift, sCount, bsCount], i) => {
    state.bMarks[i + startLine] = bMark;
    state.tShift[i + startLine] = tShift;
    state.sCount[i + startLine] = sCount;
    state.bsCount[i + startLine] = bsCount;
  });
  state.blkIndent = oldIndent;
  return true;
}

function hr(state, startLine, endLine, silent) {
  let pos = state.bMarks[startLine] + state.tShift[startLine];
  const max = state.eMarks[startLine];
  if (state.isCodeBlock(startLine)) return false;
  const marker = state.src[pos++];
  if (marker !== "*" && marker !== "-" && marker !== "_") return false;
  let count = 1;
  while (pos < max) {
    const ch = state.src[pos++];
    if (ch !== marker && !isSpace(ch)) return false;
    if (ch === marker) count += 1;
  }
  if (count < 3) return false;
  if (silent) return true;
  state.line = startLine + 1;
  const token = state.push("hr", "hr", 0);
  token.map = [startLine, state.line];
  return true;
}

function skipBulletListMarker(state, line) {
  let pos = state.bMarks[line] + state.tShift[line];
  const max = state.eMarks[line];
  const marker = state.src[pos++];
  if (marker !== "*" && marker !== "-" && marker !== "+") return -1;
  if (pos < max && !isSpace(state.src[pos])) return -1;
  return pos;
}

function skipOrderedListMarker(state, line) {
  const start = state.bMarks[line] + state.tShift[line];
  let pos = start;
  const max = state.eMarks[line];
  if (pos + 1 >= max) return -1;
  let ch = state.src[pos++];
  if (ch < "0" || ch > "9") return -1;
  for (;;) {
    if (pos >= max) return -1;
    ch = state.src[pos++];
    if (ch >= "0" && ch <= "9") {
      if (pos - start >= 10) return -1;
      continue;
    }
    if (ch === ")" || ch === ".") break;
    return -1;
  }
  if (pos < max && !isSpace(state.src[pos])) return -1;
  return pos;
}

function markTightParagraphs(state, idx) {
  const level = state.level + 2;
  for (let i = idx + 2, l = state.tokens.length - 2; i < l; i += 1) {
    if (state.tokens[i].level === level && state.tokens[i].type === "paragraph_open") {
      state.tokens[i + 2].hidden = true;
      state.tokens[i].hidden = true;
      i += 2;
    }
  }
}

function list(state, startLine, endLine, silent) {
  let isTerminatingParagraph = false;
  let tight = true;
  if (state.isCodeBlock(startLine)) return false;
  if (state.listIndent >= 0 && state.sCount[startLine] - state.listIndent >= 4 && state.sCount[startLine] < state.blkIndent) {
    return false;
  }
  if (silent && state.parentType === "paragraph" && state.sCount[startLine] >= state.blkIndent) {
    isTerminatingParagraph = true;
  }
  let isOrdered;
  let markerValue;
  let start;
  let posAfterMarker = skipOrderedListMarker(state, startLine);
  if (posAfterMarker >= 0) {
    isOrdered = true;
    start = state.bMarks[startLine] + state.tShift[startLine];
    markerValue = Number(state.src.slice(start, posAfterMarker - 1));
    if (isTerminatingParagraph && markerValue !== 1) return false;
  } else {
    posAfterMarker = skipBulletListMarker(state, startLine);
    if (posAfterMarker < 0) return false;
    isOrdered = false;
  }
  if (isTerminatingParagraph && state.skipSpaces(posAfterMarker) >= state.eMarks[startLine]) return false;
  const markerChar = state.src[posAfterMarker - 1];
  if (silent) return true;
  const listTokIdx = state.tokens.length;
  const open = isOrdered ? state.push("ordered_list_open", "ol", 1) : state.push("bullet_list_open", "ul", 1);
  if (isOrdered && markerValue !== 1) open.attrs = [["start", String(markerValue)]];
  const listLines = [startLine, 0];
  open.map = listLines;
  let nextLine = startLine;
  let prevEmptyEnd = false;
  const oldParentType = state.parentType;
  state.parentType = "list";
  while (nextLine < endLine) {
    let pos = posAfterMarker;
    const max = state.eMarks[nextLine];
    const initial = state.sCount[nextLine] + posAfterMarker - (state.bMarks[startLine] + state.tShift[startLine]);
    let offset = initial;
    while (pos < max) {
      const ch = state.src[pos];
      if (ch === "\t") offset += 4 - ((offset + state.bsCount[nextLine]) % 4);
      else if (ch === " ") offset += 1;
      else break;
      pos += 1;
    }
    const contentStart = pos;
    let indentAfterMarker = contentStart >= max ? 1 : offset - initial;
    if (indentAfterMarker > 4) indentAfterMarker = 1;
    const indent = initial + indentAfterMarker;
    const item = state.push("list_item_open", "li", 1);
    const itemLines = [startLine, 0];
    item.map = itemLines;
    const oldTight = state.tight;
    const oldTShift = state.tShift[startLine];
    const oldSCount = state.sCount[startLine];
    const oldListIndent = state.listIndent;
    state.listIndent = state.blkIndent;
    state.blkIndent = indent;
    state.tight = true;
    state.tShift[startLine] = contentStart - state.bMarks[startLine];
    state.sCount[startLine] = offset;
    if (contentStart >= max && state.isEmpty(startLine + 1)) {
      state.line = Math.min(state.line + 2, endLine);
    } else {
      blockTokenize(state, startLine, endLine);
    }
    if (!state.tight || prevEmptyEnd) tight = false;
    prevEmptyEnd = state.line - startLine > 1 && state.isEmpty(state.line - 1);
    state.blkIndent = state.listIndent;
    state.listIndent = oldListIndent;
    state.tShift[startLine] = oldTShift;
    state.sCount[startLine] = oldSCount;
    state.tight = oldTight;
    state.push("list_item_close", "li", -1);
    nextLine = startLine = state.line;
    itemLines[1] = nextLine;
    if (nextLine >= endLine) break;
    if (state.sCount[nextLine] < state.blkIndent) break;
    if (state.isCodeBlock(startLine)) break;
    if (terminates(LIST_TERMINATORS, state, nextLine, endLine)) break;
    if (isOrdered) {
      posAfterMarker = skipOrderedListMarker(state, nextLine);
      if (posAfterMarker < 0) break;
      start = state.bMarks[nextLine] + state.tShift[nextLine];
    } else {
      posAfterMarker = skipBulletListMarker(state, nextLine);
      if (posAfterMarker < 0) break;
    }
    if (markerChar !== state.src[posAfterMarker - 1]) break;
  }
  state.push(isOrdered ? "ordered_list_close" : "bullet_list_close", isOrdered ? "ol" : "ul", -1);
  listLines[1] = nextLine;
  state.line = nextLine;
  state.parentType = oldParentType;
  if (tight) markTightParagraphs(state, listTokIdx);
  return true;
}

function nextReferenceLine(state, line) {
  if (line >= state.lineMax || state.isEmpty(line)) return null;
  const continuation = state.isCodeBlock(line) || state.sCount[line] < 0;
  if (!continuation) {
    const oldParentType = state.parentType;
    state.parentType = "reference";
    const stop = terminates(PARAGRAPH_TERMINATORS, state, line, state.lineMax);
    state.parentType = oldParentType;
    if (stop) return null;
  }
  return state.src.slice(state.bMarks[line] + state.tShift[line], state.eMarks[line] + 1);
}

function reference(state, startLine, _endLine, silent) {
  let pos = state.bMarks[startLine] + state.tShift[startLine];
  let max = state.eMarks[startLine];
  let nextLine = startLine + 1;
  if (state.isCodeBlock(startLine)) return false;
  if (state.src[pos] !== "[") return false;
  let str = state.src.slice(pos, max + 1);
  max = str.length;
  const more = () => {
    const content = nextReferenceLine(state, nextLine);
    if (content === null) return false;
    str += content;
    max = str.length;
    nextLine += 1;
    return true;
  };
  let labelEnd = -1;
  for (pos = 1; pos < max; pos += 1) {
    const ch = str[pos];
    if (ch === "[") return false;
    if (ch === "]") {
      labelEnd = pos;
      break;
    }
    if (ch === "\n") more();
    else if (ch === "\\") {
      pos += 1;
      if (pos < max && str[pos] === "\n") more();
    }
  }
  if (labelEnd < 0 || str[labelEnd + 1] !== ":") return false;
  for (pos = labelEnd + 2; pos < max; pos += 1) {
    const ch = str[pos];
    if (ch === "\n") more();
    else if (!isSpace(ch)) break;
  }
  const dest = parseLinkDestination(str, pos, max);
  if (!dest.ok) return false;
  const href = normalizeLink(dest.str);
  if (!validateLink(href)) return false;
  pos = dest.pos;
  const destEndPos = pos;
  const destEndLineNo = nextLine;
  const start = pos;
  for (; pos < max; pos += 1) {
    const ch = str[pos];
    if (ch === "\n") more();
    else if (!isSpace(ch)) break;
  }
  let titleRes = parseLinkTitle(str, pos, max, null);
  while (titleRes.canContinue) {
    const before = max;
    if (!more()) break;
    pos = before;
    titleRes = parseLinkTitle(str, pos, max, titleRes);
  }
  let title;
  if (pos < max && start !== pos && titleRes.ok) {
    title = titleRes.str;
    pos = titleRes.pos;
  } else {
    title = "";
    pos = destEndPos;
    nextLine = destEndLineNo;
  }
  while (pos < max && isSpace(str[pos])) pos += 1;
  if (pos < max && str[pos] !== "\n" && title) {
    title = "";
    pos = destEndPos;
    nextLine = destEndLineNo;
    while (pos < max && isSpace(str[pos])) pos += 1;
  }
  if (pos < max && str[pos] !== "\n") return false;
  const label = normalizeReference(str.slice(1, labelEnd));
  if (!label) return false;
  if (silent) return true;
  state.env.references ??= {};
  state.line = nextLine;
  if (!Object.hasOwn(state.env.references, label)) state.env.references[label] = { title, href };
  return true;
}

function heading(state, startLine, endLine, silent) {
  let pos = state.bMarks[startLine] + state.tShift[startLine];
  let max = state.eMarks[startLine];
  if (state.isCodeBlock(startLine)) return false;
  let ch = state.src[pos];
  if (ch !== "#" || pos >= max) return false;
  let level = 1;
  ch = state.src[++pos];
  while (ch === "#" && pos < max && level <= 6) {
    level += 1;
    ch = state.src[++pos];
  }
  if (level > 6 || (pos < max && !isSpace(ch))) return false;
  if (silent) return true;
  max = state.skipSpacesBack(max, pos);
  const tmp = state.skipCharsBack(max, "#", pos);
  if (tmp > pos && isSpace(state.src[tmp - 1])) max = tmp;
  state.line = startLine + 1;
  const open = state.push("heading_open", `h${level}`, 1);
  open.map = [startLine, state.line];
  const inline = state.push("inline", "", 0);
  inline.content = mdTrim(state.src.slice(pos, max));
  inline.children = [];
  state.push("heading_close", `h${level}`, -1);
  return true;
}

function lheading(state, startLine, endLine) {
  let level = null;
  let nextLine = startLine + 1;
  if (state.isCodeBlock(startLine)) return false;
  const oldParentType = state.parentType;
  state.parentType = "paragraph";
  for (; nextLine < endLine && !state.isEmpty(nextLine); nextLine += 1) {
    if (state.sCount[nextLine] - state.blkIndent > 3) continue;
    if (state.sCount[nextLine] >= state.blkIndent) {
      let pos = state.bMarks[nextLine] + state.tShift[nextLine];
      const max = state.eMarks[nextLine];
      if (pos < max) {
        const marker = state.src[pos];
        if (marker === "-" || marker === "=") {
          pos = state.skipSpaces(state.skipChars(pos, marker));
          if (pos >= max) {
            level = marker === "=" ? 1 : 2;
            break;
          }
        }
      }
    }
    if (state.sCount[nextLine] < 0) continue;
    if (terminates(PARAGRAPH_TERMINATORS, state, nextLine, endLine)) break;
  }
  // markdown-it leaves parentType as "paragraph" here; so must we, to read text as it does.
  if (!level) return false;
  const content = mdTrim(state.getLines(startLine, nextLine, state.blkIndent, false));
  state.line = nextLine + 1;
  const open = state.push("heading_open", `h${level}`, 1);
  open.map = [startLine, state.line];
  const inline = state.push("inline", "", 0);
  inline.content = content;
  inline.children = [];
  state.push("heading_close", `h${level}`, -1);
  state.parentType = oldParentType;
  return true;
}

function paragraph(state, startLine) {
  let nextLine = startLine + 1;
  const endLine = state.lineMax;
  const oldParentType = state.parentType;
  state.parentType = "paragraph";
  for (; nextLine < endLine && !state.isEmpty(nextLine); nextLine += 1) {
    if (state.sCount[nextLine] - state.blkIndent > 3) continue;
    if (state.sCount[nextLine] < 0) continue;
    if (terminates(PARAGRAPH_TERMINATORS, state, nextLine, endLine)) break;
  }
  const content = mdTrim(state.getLines(startLine, nextLine, state.blkIndent, false));
  state.line = nextLine;
  const open = state.push("paragraph_open", "p", 1);
  open.map = [startLine, state.line];
  const inline = state.push("inline", "", 0);
  inline.content = content;
  inline.children = [];
  state.push("paragraph_close", "p", -1);
  state.parentType = oldParentType;
  return true;
}

const BLOCK_RULES = [table, code, fence, blockquote, hr, list, reference, heading, lheading, paragraph];
const PARAGRAPH_TERMINATORS = [table, fence, blockquote, hr, list, heading];
const BLOCKQUOTE_TERMINATORS = [fence, blockquote, hr, list, heading];
const LIST_TERMINATORS = [fence, blockquote, hr];

// --- link helpers ----------------------------------------------------------------------

function parseLinkLabel(state, start, disableNested) {
  const oldPos = state.pos;
  let found = false;
  let level = 1;
  state.pos = start + 1;
  while (state.pos < state.posMax) {
    const marker = state.src[state.pos];
    if (marker === "]") {
      level -= 1;
      if (level === 0) {
        found = true;
        break;
      }
    }
    const prevPos = state.pos;
    skipToken(state);
    if (marker === "[") {
      if (prevPos === state.pos - 1) level += 1;
      else if (disableNested) {
        state.pos = oldPos;
        return -1;
      }
    }
  }
  const labelEnd = found ? state.pos : -1;
  state.pos = oldPos;
  return labelEnd;
}

function parseLinkDestination(str, start, max) {
  let pos = start;
  const result = { ok: false, pos: 0, str: "" };
  if (str[pos] === "<") {
    pos += 1;
    while (pos < max) {
      const ch = str[pos];
      if (ch === "\n" || ch === "<") return result;
      if (ch === ">") {
        result.pos = pos + 1;
        result.str = unescapeAll(str.slice(start + 1, pos));
        result.ok = true;
        return result;
      }
      if (ch === "\\" && pos + 1 < max) {
        pos += 2;
        continue;
      }
      pos += 1;
    }
    return result;
  }
  let level = 0;
  while (pos < max) {
    const code = str.charCodeAt(pos);
    if (code === 0x20) break;
    if (code < 0x20 || code === 0x7f) break;
    if (code === 0x5c && pos + 1 < max) {
      if (str.charCodeAt(pos + 1) === 0x20) break;
      pos += 2;
      continue;
    }
    if (code === 0x28) {
      level += 1;
      if (level > 32) return result;
    }
    if (code === 0x29) {
      if (level === 0) break;
      level -= 1;
    }
    pos += 1;
  }
  if (start === pos || level !== 0) return result;
  result.str = unescapeAll(str.slice(start, pos));
  result.pos = pos;
  result.ok = true;
  return result;
}

function parseLinkTitle(str, start, max, prev) {
  let pos = start;
  const state = { ok: false, canContinue: false, pos: 0, str: "", marker: "" };
  if (prev) {
    state.str = prev.str;
    state.marker = prev.marker;
  } else {
    if (pos >= max) return state;
    let marker = str[pos];
    if (marker !== '"' && marker !== "'" && marker !== "(") return state;
    start += 1;
    pos += 1;
    if (marker === "(") marker = ")";
    state.marker = marker;
  }
  while (pos < max) {
    const ch = str[pos];
    if (ch === state.marker) {
      state.pos = pos + 1;
      state.str += unescapeAll(str.slice(start, pos));
      state.ok = true;
      return state;
    }
    if (ch === "(" && state.marker === ")") return state;
    if (ch === "\\" && pos + 1 < max) pos += 1;
    pos += 1;
  }
  state.canContinue = true;
  state.str += unescapeAll(str.slice(start, pos));
  return state;
}

// --- inline parsing --------------------------------------------------------------------

const TERMINATORS = new Set("\n!#$%&*+-:<=>@[\\]^_`{}~");

class InlineState {
  constructor(src, env, tokens) {
    this.src = src;
    this.env = env;
    this.tokens = tokens;
    this.tokensMeta = new Array(tokens.length).fill(null);
    this.pos = 0;
    this.posMax = src.length;
    this.level = 0;
    this.pending = "";
    this.pendingLevel = 0;
    this.cache = new Map();
    this.delimiters = [];
    this.prevDelimiters = [];
    this.backticks = null;
  }

  pushPending() {
    const token = new Token("text", "", 0);
    token.content = this.pending;
    token.level = this.pendingLevel;
    this.tokens.push(token);
    this.tokensMeta.push(null);
    this.pending = "";
    return token;
  }

  push(type, tag, nesting) {
    if (this.pending) this.pushPending();
    const token = new Token(type, tag, nesting);
    let meta = null;
    if (nesting < 0) {
      this.level -= 1;
      this.delimiters = this.prevDelimiters.pop();
    }
    token.level = this.level;
    if (nesting > 0) {
      this.level += 1;
      this.prevDelimiters.push(this.delimiters);
      this.delimiters = [];
      meta = { delimiters: this.delimiters };
    }
    this.pendingLevel = this.level;
    this.tokens.push(token);
    this.tokensMeta.push(meta);
    return token;
  }

  // The character before `start` and after the run, as whole code points (Python's view).
  scanDelims(start, canSplitWord) {
    const marker = this.src[start];
    let lastChar = " ";
    if (start > 0) {
      const low = this.src.charCodeAt(start - 1);
      lastChar = low >= 0xdc00 && low <= 0xdfff && start > 1 ? String.fromCodePoint(this.src.codePointAt(start - 2)) : this.src[start - 1];
    }
    let pos = start;
    while (pos < this.posMax && this.src[pos] === marker) pos += 1;
    const count = pos - start;
    const nextChar = pos < this.posMax ? String.fromCodePoint(this.src.codePointAt(pos)) : " ";
    const lastPunct = isMdAsciiPunct(lastChar) || isPunctChar(lastChar);
    const nextPunct = isMdAsciiPunct(nextChar) || isPunctChar(nextChar);
    const lastWhite = isWhiteSpace(lastChar.codePointAt(0));
    const nextWhite = isWhiteSpace(nextChar.codePointAt(0));
    const leftFlanking = !(nextWhite || (nextPunct && !(lastWhite || lastPunct)));
    const rightFlanking = !(lastWhite || (lastPunct && !(nextWhite || nextPunct)));
    return {
      canOpen: leftFlanking && (canSplitWord || !rightFlanking || lastPunct),
      canClose: rightFlanking && (canSplitWord || !leftFlanking || nextPunct),
      length: count,
    };
  }
}

function ruleText(state, silent) {
  let pos = state.pos;
  while (pos < state.posMax && !TERMINATORS.has(state.src[pos])) pos += 1;
  if (pos === state.pos) return false;
  if (!silent) state.pending += state.src.slice(state.pos, pos);
  state.pos = pos;
  return true;
}

function ruleNewline(state, silent) {
  let pos = state.pos;
  if (state.src[pos] !== "\n") return false;
  const pmax = state.pending.length - 1;
  if (!silent) {
    if (pmax >= 0 && state.pending[pmax] === " ") {
      if (pmax >= 1 && state.pending[pmax - 1] === " ") {
        let ws = pmax - 1;
        while (ws >= 1 && state.pending[ws - 1] === " ") ws -= 1;
        state.pending = state.pending.slice(0, ws);
        state.push("hardbreak", "br", 0);
      } else {
        state.pending = state.pending.slice(0, -1);
        state.push("softbreak", "br", 0);
      }
    } else {
      state.push("softbreak", "br", 0);
    }
  }
  pos += 1;
  while (pos < state.posMax && isSpace(state.src[pos])) pos += 1;
  state.pos = pos;
  return true;
}

function ruleEscape(state, silent) {
  let pos = state.pos;
  if (state.src[pos] !== "\\") return false;
  pos += 1;
  if (pos >= state.posMax) return false;
  const ch = state.src[pos];
  if (ch === "\n") {
    if (!silent) state.push("hardbreak", "br", 0);
    pos += 1;
    while (pos < state.posMax && isSpace(state.src[pos])) pos += 1;
    state.pos = pos;
    return true;
  }
  let escaped = ch;
  const code = ch.charCodeAt(0);
  if (code >= 0xd800 && code <= 0xdbff && pos + 1 < state.posMax) {
    const low = state.src.charCodeAt(pos + 1);
    if (low >= 0xdc00 && low <= 0xdfff) {
      escaped += state.src[pos + 1];
      pos += 1;
    }
  }
  if (!silent) {
    const token = state.push("text_special", "", 0);
    token.content = ASCII_PUNCT.has(ch) ? escaped : `\\${escaped}`;
  }
  state.pos = pos + 1;
  return true;
}

function ruleBackticks(state, silent) {
  const start = state.pos;
  if (state.src[start] !== "`") return false;
  const max = state.posMax;
  let pos = start + 1;
  while (pos < max && state.src[pos] === "`") pos += 1;
  const marker = state.src.slice(start, pos);
  const openerLength = marker.length;
  if (!state.backticks) {
    // The last position of each backtick run length: a run with no later equal run is text.
    state.backticks = new Map();
    let at = 0;
    for (;;) {
      const found = state.src.indexOf("`", at);
      if (found < 0) break;
      at = found + 1;
      while (at < state.src.length && state.src[at] === "`") at += 1;
      state.backticks.set(at - found, found);
    }
  }
  if ((state.backticks.get(openerLength) ?? -1) >= pos) {
    let matchEnd = pos;
    for (;;) {
      const matchStart = state.src.indexOf("`", matchEnd);
      if (matchStart < 0 || matchStart >= max) break;
      matchEnd = matchStart + 1;
      while (matchEnd < state.src.length && state.src[matchEnd] === "`") matchEnd += 1;
      if (matchEnd > max) break;
      if (matchEnd - matchStart === openerLength) {
        if (!silent) {
          const token = state.push("code_inline", "code", 0);
          let content = state.src.slice(pos, matchStart).replaceAll("\n", " ");
          if (content.startsWith(" ") && content.endsWith(" ") && /[^ ]/.test(content)) {
            content = content.slice(1, -1);
          }
          token.content = content;
        }
        state.pos = matchEnd;
        return true;
      }
    }
  }
  if (!silent) state.pending += marker;
  state.pos = pos;
  return true;
}

function ruleStrikethrough(state, silent) {
  if (silent || state.src[state.pos] !== "~") return false;
  const scanned = state.scanDelims(state.pos, true);
  let len = scanned.length;
  if (len < 2) return false;
  if (len % 2) {
    state.push("text", "", 0).content = "~";
    len -= 1;
  }
  for (let i = 0; i < len; i += 2) {
    state.push("text", "", 0).content = "~~";
    state.delimiters.push({ marker: "~", length: 0, token: state.tokens.length - 1, end: -1, open: scanned.canOpen, close: scanned.canClose });
  }
  state.pos += scanned.length;
  return true;
}

function ruleEmphasis(state, silent) {
  const marker = state.src[state.pos];
  if (silent || (marker !== "_" && marker !== "*")) return false;
  const scanned = state.scanDelims(state.pos, marker === "*");
  for (let i = 0; i < scanned.length; i += 1) {
    state.push("text", "", 0).content = marker;
    state.delimiters.push({ marker, length: scanned.length, token: state.tokens.length - 1, end: -1, open: scanned.canOpen, close: scanned.canClose });
  }
  state.pos += scanned.length;
  return true;
}

function skipLinkSpace(state, pos) {
  while (pos < state.posMax && (isSpace(state.src[pos]) || state.src[pos] === "\n")) pos += 1;
  return pos;
}

/** The `[label]` (or `[]`, or nothing) after a link's text, as a known reference. */
function referenceAfter(state, labelStart, labelEnd, pos) {
  if (!state.env.references) return null;
  let label = null;
  if (pos < state.posMax && state.src[pos] === "[") {
    const start = pos + 1;
    pos = parseLinkLabel(state, pos, false);
    if (pos >= 0) {
      label = state.src.slice(start, pos);
      pos += 1;
    } else {
      pos = labelEnd + 1;
    }
  } else {
    pos = labelEnd + 1;
  }
  if (!label) label = state.src.slice(labelStart, labelEnd);
  const ref = state.env.references[normalizeReference(label)];
  return ref ? { ...ref, pos } : null;
}

function ruleLink(state, silent) {
  if (state.src[state.pos] !== "[") return false;
  const oldPos = state.pos;
  const max = state.posMax;
  let href = "";
  let title = "";
  let parseReference = true;
  const labelStart = state.pos + 1;
  const labelEnd = parseLinkLabel(state, state.pos, true);
  if (labelEnd < 0) return false;
  let pos = labelEnd + 1;
  if (pos < max && state.src[pos] === "(") {
    parseReference = false;
    pos = skipLinkSpace(state, pos + 1);
    if (pos >= max) return false;
    let start = pos;
    let res = parseLinkDestination(state.src, pos, state.posMax);
    if (res.ok) {
      href = normalizeLink(res.str);
      if (validateLink(href)) pos = res.pos;
      else href = "";
      start = pos;
      pos = skipLinkSpace(state, pos);
      res = parseLinkTitle(state.src, pos, state.posMax, null);
      if (pos < max && start !== pos && res.ok) {
        title = res.str;
        pos = skipLinkSpace(state, res.pos);
      }
    }
    if (pos >= max || state.src[pos] !== ")") parseReference = true;
    pos += 1;
  }
  if (parseReference) {
    const ref = referenceAfter(state, labelStart, labelEnd, pos);
    if (!ref) {
      state.pos = oldPos;
      return false;
    }
    ({ href, title, pos } = ref);
  }
  if (!silent) {
    state.pos = labelStart;
    state.posMax = labelEnd;
    const open = state.push("link_open", "a", 1);
    open.attrs = [["href", href]];
    if (title) open.attrSet("title", title);
    inlineTokenize(state);
    state.push("link_close", "a", -1);
  }
  state.pos = pos;
  state.posMax = max;
  return true;
}

function ruleImage(state, silent) {
  if (state.src[state.pos] !== "!") return false;
  if (state.pos + 1 < state.posMax && state.src[state.pos + 1] !== "[") return false;
  const oldPos = state.pos;
  const max = state.posMax;
  let href = "";
  let title = "";
  const labelStart = state.pos + 2;
  const labelEnd = parseLinkLabel(state, state.pos + 1, false);
  if (labelEnd < 0) return false;
  let pos = labelEnd + 1;
  if (pos < max && state.src[pos] === "(") {
    pos = skipLinkSpace(state, pos + 1);
    if (pos >= max) return false;
    let res = parseLinkDestination(state.src, pos, state.posMax);
    if (res.ok) {
      href = normalizeLink(res.str);
      if (validateLink(href)) pos = res.pos;
      else href = "";
    }
    const start = pos;
    pos = skipLinkSpace(state, pos);
    res = parseLinkTitle(state.src, pos, state.posMax, null);
    if (pos < max && start !== pos && res.ok) {
      title = res.str;
      pos = skipLinkSpace(state, res.pos);
    }
    if (pos >= max || state.src[pos] !== ")") {
      state.pos = oldPos;
      return false;
    }
    pos += 1;
  } else {
    const ref = referenceAfter(state, labelStart, labelEnd, pos);
    if (!ref) {
      state.pos = oldPos;
      return false;
    }
    ({ href, title, pos } = ref);
  }
  if (!silent) {
    const children = [];
    inlineParse(state.src.slice(labelStart, labelEnd), state.env, children);
    const token = state.push("image", "img", 0);
    token.attrs = [["src", href], ["alt", ""]];
    token.children = children;
    if (title) token.attrSet("title", title);
  }
  state.pos = pos;
  state.posMax = max;
  return true;
}

const AUTOLINK = /^([a-zA-Z][a-zA-Z0-9+.-]{1,31}):([^<>\x00-\x20]*)$/;
const EMAIL = /^([a-zA-Z0-9.!#$%&'*+/=?^_`{|}~-]+@[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)*)$/;

function ruleAutolink(state, silent) {
  let pos = state.pos;
  if (state.src[pos] !== "<") return false;
  const start = pos;
  for (;;) {
    pos += 1;
    if (pos >= state.posMax) return false;
    const ch = state.src[pos];
    if (ch === "<") return false;
    if (ch === ">") break;
  }
  const url = state.src.slice(start + 1, pos);
  let fullUrl = null;
  if (AUTOLINK.test(url)) fullUrl = normalizeLink(url);
  else if (EMAIL.test(url)) fullUrl = normalizeLink(`mailto:${url}`);
  else return false;
  if (!validateLink(fullUrl)) return false;
  if (!silent) {
    state.push("link_open", "a", 1).attrs = [["href", fullUrl]];
    state.push("text", "", 0).content = normalizeLinkText(url);
    state.push("link_close", "a", -1);
  }
  state.pos += url.length + 2;
  return true;
}

function ruleEntity(state, silent) {
  const pos = state.pos;
  if (state.src[pos] !== "&" || pos + 1 >= state.posMax) return false;
  const rest = state.src.slice(pos, pos + 40);
  let match;
  if (state.src[pos + 1] === "#") {
    match = /^&#((?:x[a-f0-9]{1,6}|[0-9]{1,7}));/i.exec(rest);
    if (!match) return false;
    if (!silent) {
      const code = match[1][0].toLowerCase() === "x" ? parseInt(match[1].slice(1), 16) : parseInt(match[1], 10);
      state.push("text_special", "", 0).content = String.fromCodePoint(isValidEntityCode(code) ? code : 0xfffd);
    }
  } else {
    match = /^&([a-z][a-z0-9]{1,31});/i.exec(rest);
    if (!match || !Object.hasOwn(ENTITIES, match[1])) return false;
    if (!silent) state.push("text_special", "", 0).content = ENTITIES[match[1]];
  }
  state.pos += match[0].length;
  return true;
}

const INLINE_RULES = [ruleText, ruleNewline, ruleEscape, ruleBackticks, ruleStrikethrough, ruleEmphasis, ruleLink, ruleImage, ruleAutolink, ruleEntity];

function skipToken(state) {
  const pos = state.pos;
  if (state.cache.has(pos)) {
    state.pos = state.cache.get(pos);
    return;
  }
  let ok = false;
  if (state.level < MAX_NESTING) {
    for (const rule of INLINE_RULES) {
      state.level += 1;
      ok = rule(state, true);
      state.level -= 1;
      if (ok) break;
    }
  } else {
    state.pos = state.posMax;
  }
  if (!ok) state.pos += 1;
  state.cache.set(pos, state.pos);
}

function inlineTokenize(state) {
  const end = state.posMax;
  while (state.pos < end) {
    let ok = false;
    if (state.level < MAX_NESTING) {
      for (const rule of INLINE_RULES) {
        ok = rule(state, false);
        if (ok) break;
      }
    }
    if (ok) {
      if (state.pos >= end) break;
      continue;
    }
    state.pending += state.src[state.pos];
    state.pos += 1;
  }
  if (state.pending) state.pushPending();
}

function processDelimiters(delimiters) {
  if (!delimiters.length) return;
  const openersBottom = {};
  let headerIdx = 0;
  let lastTokenIdx = -2;
  const jumps = [];
  for (let closerIdx = 0; closerIdx < delimiters.length; closerIdx += 1) {
    const closer = delimiters[closerIdx];
    jumps.push(0);
    if (delimiters[headerIdx].marker !== closer.marker || lastTokenIdx !== closer.token - 1) headerIdx = closerIdx;
    lastTokenIdx = closer.token;
    closer.length = closer.length || 0;
    if (!closer.close) continue;
    openersBottom[closer.marker] ??= [-1, -1, -1, -1, -1, -1];
    const minOpenerIdx = openersBottom[closer.marker][(closer.open ? 3 : 0) + (closer.length % 3)];
    let openerIdx = headerIdx - jumps[headerIdx] - 1;
    let newMinOpenerIdx = openerIdx;
    while (openerIdx > minOpenerIdx) {
      const opener = delimiters[openerIdx];
      if (opener.marker !== closer.marker) {
        openerIdx -= jumps[openerIdx] + 1;
        continue;
      }
      if (opener.open && opener.end < 0) {
        const isOddMatch =
          (opener.close || closer.open) &&
          (opener.length + closer.length) % 3 === 0 &&
          (opener.length % 3 !== 0 || closer.length % 3 !== 0);
        if (!isOddMatch) {
          const lastJump = openerIdx > 0 && !delimiters[openerIdx - 1].open ? jumps[openerIdx - 1] + 1 : 0;
          jumps[closerIdx] = closerIdx - openerIdx + lastJump;
          jumps[openerIdx] = lastJump;
          closer.open = false;
          opener.end = closerIdx;
          opener.close = false;
          newMinOpenerIdx = -1;
          lastTokenIdx = -2;
          break;
        }
      }
      openerIdx -= jumps[openerIdx] + 1;
    }
    if (newMinOpenerIdx !== -1) {
      openersBottom[closer.marker][(closer.open ? 3 : 0) + ((closer.length || 0) % 3)] = newMinOpenerIdx;
    }
  }
}

function strikethroughPost(state, delimiters) {
  const loneMarkers = [];
  for (const startDelim of delimiters) {
    if (startDelim.marker !== "~" || startDelim.end === -1) continue;
    const endDelim = delimiters[startDelim.end];
    Object.assign(state.tokens[startDelim.token], { type: "s_open", tag: "s", nesting: 1, content: "" });
    Object.assign(state.tokens[endDelim.token], { type: "s_close", tag: "s", nesting: -1, content: "" });
    const before = state.tokens[endDelim.token - 1];
    if (before.type === "text" && before.content === "~") loneMarkers.push(endDelim.token - 1);
  }
  while (loneMarkers.length) {
    const i = loneMarkers.pop();
    let j = i + 1;
    while (j < state.tokens.length && state.tokens[j].type === "s_close") j += 1;
    j -= 1;
    if (i !== j) [state.tokens[i], state.tokens[j]] = [state.tokens[j], state.tokens[i]];
  }
}

function emphasisPost(state, delimiters) {
  for (let i = delimiters.length - 1; i >= 0; i -= 1) {
    const startDelim = delimiters[i];
    if ((startDelim.marker !== "_" && startDelim.marker !== "*") || startDelim.end === -1) continue;
    const endDelim = delimiters[startDelim.end];
    const isStrong =
      i > 0 &&
      delimiters[i - 1].end === startDelim.end + 1 &&
      delimiters[i - 1].marker === startDelim.marker &&
      delimiters[i - 1].token === startDelim.token - 1 &&
      delimiters[startDelim.end + 1].token === endDelim.token + 1;
    const tag = isStrong ? "strong" : "em";
    Object.assign(state.tokens[startDelim.token], { type: `${tag}_open`, tag, nesting: 1, content: "" });
    Object.assign(state.tokens[endDelim.token], { type: `${tag}_close`, tag, nesting: -1, content: "" });
    if (isStrong) {
      state.tokens[delimiters[i - 1].token].content = "";
      state.tokens[delimiters[startDelim.end + 1].token].content = "";
      i -= 1;
    }
  }
}

function eachDelimiterList(state, fn) {
  fn(state, state.delimiters);
  for (const meta of state.tokensMeta) if (meta?.delimiters) fn(state, meta.delimiters);
}

function fragmentsJoin(state) {
  const tokens = state.tokens;
  const joined = [];
  for (let curr = 0; curr < tokens.length; curr += 1) {
    if (tokens[curr].type === "text" && joined.length && joined.at(-1).type === "text") {
      joined.at(-1).content += tokens[curr].content;
    } else {
      joined.push(tokens[curr]);
    }
  }
  tokens.splice(0, tokens.length, ...joined);
}

function inlineParse(src, env, tokens) {
  const state = new InlineState(src, env, tokens);
  inlineTokenize(state);
  eachDelimiterList(state, (s, delimiters) => processDelimiters(delimiters));
  eachDelimiterList(state, strikethroughPost);
  eachDelimiterList(state, emphasisPost);
  fragmentsJoin(state);
  return tokens;
}

function joinText(tokens) {
  const out = [];
  for (const token of tokens) {
    if (token.type === "text_special") token.type = "text";
    if (token.type === "text" && out.length && out.at(-1).type === "text") out.at(-1).content += token.content;
    else out.push(token);
  }
  return out;
}

/** Parse Markdown into markdown-it's block tokens, inline children filled in. */
export function parse(source) {
  const src = source.replace(/\r\n?/g, "\n").replaceAll("\0", "\ufffd");
  const env = {};
  const tokens = [];
  if (src) {
    const state = new BlockState(src, env, tokens);
    blockTokenize(state, 0, state.lineMax);
  }
  for (const token of tokens) {
    if (token.type !== "inline") continue;
    const children = inlineParse(token.content, env, []);
    for (const child of children) if (child.children) child.children = joinText(child.children);
    token.children = joinText(children);
  }
  return { tokens, env, src };
}

// --- rendering to DOM ------------------------------------------------------------------

function inlineText(children) {
  return children.map((child) => child.content).join("");
}

/** Append the inline children to `parent`, as elements and text nodes. */
function renderInline(children, parent) {
  const stack = [parent];
  for (const token of children) {
    const into = stack.at(-1);
    switch (token.type) {
      case "text":
        into.append(token.content);
        break;
      case "softbreak":
        into.append("\n");
        break;
      case "hardbreak":
        into.append(document.createElement("br"), "\n");
        break;
      case "code_inline": {
        const el = document.createElement("code");
        el.textContent = token.content;
        into.append(el);
        break;
      }
      case "image": {
        // As on the server: a link to the image, never a request for it.
        const src = token.attrGet("src") ?? "";
        const el = document.createElement("a");
        if (keptUrl(src)) el.setAttribute("href", src);
        el.setAttribute("rel", EXTERNAL_LINK_REL);
        el.textContent = inlineText(token.children ?? []) || src;
        into.append(el);
        break;
      }
      case "link_open": {
        const href = token.attrGet("href") ?? "";
        const el = document.createElement("a");
        if (keptUrl(href)) el.setAttribute("href", href);
        const title = token.attrGet("title");
        if (title) el.setAttribute("title", title);
        if (EXTERNAL_URL.test(href)) el.setAttribute("rel", EXTERNAL_LINK_REL);
        into.append(el);
        stack.push(el);
        break;
      }
      case "em_open":
      case "strong_open":
      case "s_open": {
        const el = document.createElement(token.tag);
        into.append(el);
        stack.push(el);
        break;
      }
      case "link_close":
      case "em_close":
      case "strong_close":
      case "s_close":
        if (stack.length > 1) stack.pop();
        break;
      default:
        if (token.content) into.append(token.content);
    }
  }
}

function fenceLanguage(info) {
  const trimmed = mdTrim(unescapeAll(info ?? ""));
  return trimmed ? trimmed.split(new RegExp(`[${TRIM}]+`))[0] : "";
}

/**
 * Render block tokens [from, to) into `parent`, with the same "\n" text nodes between
 * blocks that markdown-it writes (the tree is compared with the server's, node for node).
 */
function renderTokens(tokens, from, to, parent, options) {
  const stack = [parent];
  for (let idx = from; idx < to; idx += 1) {
    const token = tokens[idx];
    const into = stack.at(-1);
    if (token.type === "inline") {
      renderInline(token.children ?? [], into);
      continue;
    }
    if (token.hidden) continue;
    // Code has a rule of its own in markdown-it, without renderToken's newline after a
    // tight list's text.
    if (token.type === "fence" || token.type === "code_block") {
      const language = token.type === "fence" ? fenceLanguage(token.info) : "";
      const pre = document.createElement("pre");
      const codeEl = document.createElement("code");
      const className = `language-${language}`;
      if (language && CODE_CLASS.test(className)) codeEl.className = className;
      codeEl.textContent = token.content;
      pre.append(codeEl);
      into.append(pre, "\n");
      options.onCode?.(pre, { language, code: token.content, final: token.type === "code_block" || token.closed });
      continue;
    }
    if (token.block && token.nesting !== -1 && idx && tokens[idx - 1].hidden) into.append("\n");
    if (token.nesting === -1) {
      if (stack.length > 1) stack.pop();
      stack.at(-1).append("\n");
      continue;
    }
    const el = document.createElement(token.tag);
    for (const [name, value] of token.attrs ?? []) el.setAttribute(name, value);
    into.append(el);
    if (token.nesting === 1) stack.push(el);
    let needLf = true;
    if (token.nesting === 1 && idx + 1 < tokens.length) {
      const next = tokens[idx + 1];
      if (next.type === "inline" || next.hidden) needLf = false;
      else if (next.nesting === -1 && next.tag === token.tag) needLf = false;
    }
    if (needLf) (token.nesting === 1 ? el : into).append("\n");
  }
}

/** Markdown as a fragment of elements and text nodes (the whole of it, in one go). */
export function renderMarkdown(source, options = {}) {
  const { tokens } = parse(source);
  const fragment = document.createDocumentFragment();
  renderTokens(tokens, 0, tokens.length, fragment, options);
  fragment.normalize();
  return fragment;
}

/** The top-level blocks of some Markdown: each one's source and its token range. */
function topLevelBlocks(parsed) {
  const { tokens, src, env } = parsed;
  const lineStarts = [0];
  for (let i = src.indexOf("\n"); i >= 0; i = src.indexOf("\n", i + 1)) lineStarts.push(i + 1);
  const lineAt = (n) => (n < lineStarts.length ? lineStarts[n] : src.length);
  // References anywhere change how links everywhere read: they are part of every key.
  const refs = env.references ? JSON.stringify(env.references) : "";
  const blocks = [];
  let start = 0;
  for (let i = 0; i < tokens.length; i += 1) {
    const token = tokens[i];
    if (token.level !== 0 || token.nesting === -1) continue;
    let end = i;
    if (token.nesting === 1) {
      let depth = 0;
      for (end = i; end < tokens.length; end += 1) {
        depth += tokens[end].nesting;
        if (depth === 0) break;
      }
    }
    const [first, last] = token.map ?? [0, 0];
    blocks.push({ from: i, to: end + 1, key: `${refs}\u0000${src.slice(lineAt(first), lineAt(last))}` });
    start = end + 1;
    i = end;
  }
  return blocks;
}

const FENCE_LINE = /^(?:[ \t]*>)*[ \t]{0,3}(?:`{3,}|~{3,})/gm;
const MARKERS = new Set(["*", "_", "~"]);
const isWordChar = (ch) => ch !== undefined && /[\p{L}\p{N}]/u.test(ch);

/**
 * An unfinished answer, completed for display: the emphasis, code span or link that its
 * last paragraph has opened is closed, so the reader sees **bold** as bold while it is
 * still being written rather than asterisks that turn into bold later. A marker run at the
 * very end (an opener with nothing after it yet) is left out. Only ever used while the text
 * still grows: the finished answer is rendered exactly as written.
 */
export function completeTail(text) {
  if ((text.match(FENCE_LINE)?.length ?? 0) % 2) return text; // inside a code block
  const start = text.lastIndexOf("\n\n") + 1;
  let tail = text.slice(start);
  // An opener with nothing after it yet shows as a stray mark: leave it for the next token.
  tail = tail.replace(/(?:[*_~`[]|!\[)+$/, "");
  const stack = [];
  for (let i = 0; i < tail.length; i += 1) {
    const ch = tail[i];
    const top = stack.at(-1);
    if (top?.kind === "code") {
      if (ch === "`") {
        let run = 1;
        while (tail[i + run] === "`") run += 1;
        if (run === top.closer.length) stack.pop();
        i += run - 1;
      }
      continue;
    }
    if (ch === "\\") {
      i += 1;
      continue;
    }
    if (top?.kind === "url") {
      if (ch === ")") stack.pop();
      continue;
    }
    if (ch === "`") {
      let run = 1;
      while (tail[i + run] === "`") run += 1;
      stack.push({ kind: "code", closer: "`".repeat(run) });
      i += run - 1;
    } else if (ch === "[") {
      // Only a bracket that starts a word: `a[0` is an index, not a link.
      if (!isWordChar(tail[i - 1])) stack.push({ kind: "label", closer: "]()" });
    } else if (ch === "]") {
      const label = stack.findLastIndex((e) => e.kind === "label");
      if (label >= 0) stack.splice(label);
      if (label >= 0 && tail[i + 1] === "(") {
        stack.push({ kind: "url", closer: ")" });
        i += 1;
      }
    } else if (MARKERS.has(ch)) {
      let run = 1;
      while (tail[i + run] === ch) run += 1;
      const before = tail[i - 1];
      const after = tail[i + run];
      const open = stack.findLastIndex((e) => e.kind === "delim" && e.marker === ch && e.run === run);
      const canClose = before !== undefined && !/\s/.test(before);
      // Intraword underscores (snake_case) and single tildes never open anything.
      const canOpen =
        after !== undefined && !/\s/.test(after) && !(ch === "_" && isWordChar(before)) && !(ch === "~" && run !== 2);
      if (open >= 0 && canClose) stack.splice(open);
      else if (canOpen) stack.push({ kind: "delim", marker: ch, run, closer: ch.repeat(run) });
      i += run - 1;
    }
  }
  if (!stack.length) return text.slice(0, start) + tail;
  // A closer after a space closes nothing ("so *"): close right after the last word.
  if (stack.at(-1).kind !== "code") tail = tail.replace(/\s+$/, "");
  return text.slice(0, start) + tail + stack.reverse().map((e) => e.closer).join("");
}

/**
 * A streaming answer's Markdown, kept rendered in a container. Each `update(text)` parses the
 * whole text (cheap: a few hundred µs for a long answer) but touches only the top-level blocks
 * whose source changed, so finished paragraphs, lists and code blocks keep their nodes (and a
 * reader's selection) while the last block grows.
 */
export class LiveMarkdown {
  #blocks = [];

  /**
   * @param {HTMLElement} container where the rendering goes (it is owned by this object)
   * @param {object} [options]
   * @param {(pre: HTMLPreElement, code: {language: string, code: string, final: boolean}) => void} [options.onCode]
   *   called for every code block drawn: to decorate it, and to highlight it once final
   */
  constructor(container, options = {}) {
    this.container = container;
    this.options = options;
    this.text = "";
  }

  /**
   * Show this text; returns how many top-level blocks were drawn again.
   * @param {string} text
   * @param {object} [options]
   * @param {boolean} [options.growing] the text is still being written: show what its last
   *   paragraph has opened as closed (completeTail); false for a finished text
   */
  update(text, { growing = true } = {}) {
    this.text = text;
    const parsed = parse(growing ? completeTail(text) : text);
    const blocks = topLevelBlocks(parsed);
    const old = this.#blocks;
    let same = 0;
    while (same < old.length && same < blocks.length && old[same].key === blocks[same].key) same += 1;
    for (const block of old.slice(same)) for (const node of block.nodes) node.remove();
    const next = old.slice(0, same);
    for (const block of blocks.slice(same)) {
      const fragment = document.createDocumentFragment();
      renderTokens(parsed.tokens, block.from, block.to, fragment, this.options);
      fragment.normalize();
      const nodes = [...fragment.childNodes];
      this.container.append(fragment);
      next.push({ key: block.key, nodes });
    }
    this.#blocks = next;
    return blocks.length - same;
  }
}
