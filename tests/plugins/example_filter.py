"""An example pop3proxy filter: flag (or quarantine) mail whose Subject contains a watched word.

Enable it with a ``[[filters]]`` table in the pop3proxy configuration::

    [[filters]]
    use = "subject-watch"            # the entry point name (or "mypackage.subject_watch:SubjectWatch")
    words = ["invoice", "urgent"]
    quarantine = false
    on_error = "pass"                # the options every filter takes
    timeout = 10
"""

from __future__ import annotations

from email import policy
from email.parser import BytesHeaderParser

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pop3proxy.filtering import FilterContext, FilterOutcome, add_header


class SubjectWatch:
    name = "subject-watch"

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")  # a misspelt option fails at startup
        words: list[str] = Field(min_length=1, description="Words to look for, case-insensitive.")
        header: str = Field("X-Subject-Watch", description="Header added to matching mail.")
        quarantine: bool = Field(False, description="Quarantine matching mail instead of delivering it.")

        @field_validator("words")
        @classmethod
        def _no_blank_words(cls, words: list[str]) -> list[str]:
            if any(not word.strip() for word in words):
                raise ValueError("words must not be blank")
            return words

    def __init__(self, config: Config) -> None:
        # Runs once, at startup: check and prepare everything here, not at the first message.
        self.words = [word.casefold() for word in config.words]
        self.header = config.header
        self.quarantine = config.quarantine

    def __call__(self, message: bytes, context: FilterContext) -> FilterOutcome:
        # Parse only to read; the message is never written back from the parsed object.
        headers = BytesHeaderParser(policy=policy.default).parsebytes(message)
        subject = str(headers.get("Subject", "")).casefold()
        found = [word for word in self.words if word in subject]
        if not found:
            return FilterOutcome(message)
        verdict = "subject contains " + ", ".join(found)
        if self.quarantine:
            return FilterOutcome(message, verdict=verdict, action="quarantine")
        return FilterOutcome(add_header(message, self.header, ", ".join(found)), verdict=verdict)
