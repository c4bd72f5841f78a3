"""Print the README's LLaMA-Factory key table (Markdown) from prefalign.config.lf_keys, the table the loader reads."""

from prefalign.config.lf_keys import LF_RELEASE, SECTIONS, Answer, shown

_WORDS = {
    Answer.IMPLEMENTED: "implemented",
    Answer.NO_EFFECT: "no effect here",
    Answer.NOT_IN_PREFALIGN: "not in prefalign",
    Answer.OTHER_STAGE: "another LF stage",
}


def table() -> str:
    counts = {answer: 0 for answer in Answer}
    out = []
    for title, keys in SECTIONS.items():
        out += [f"#### {title}", "", "| key | LF default | answer | note |", "|---|---|---|---|"]
        for key, entry in keys.items():
            counts[entry.answer] += 1
            note = entry.note
            if entry.answer is Answer.OTHER_STAGE:
                note = f"LF's `stage: {entry.note.split()[0]}`" + entry.note[len(entry.note.split()[0]):]
            elif entry.rename and not note:
                note = f"as `{entry.rename[0]}`"
            out.append(f"| `{key}` | `{shown(entry.default)}` | {_WORDS[entry.answer]} | {note} |")
        out.append("")
    summary = ", ".join(f"{n} {_WORDS[a]}" for a, n in counts.items())
    return "\n".join([f"LLaMA-Factory {LF_RELEASE}: {sum(counts.values())} keys ({summary}).", ""] + out)


if __name__ == "__main__":
    print(table())
