import pytest

from qimg.errors import first_line


def test_first_line_keeps_one_line_of_a_long_message():
    err = RuntimeError("\n  connection refused  \nis the server running on host \"db\"?\n")
    assert first_line(err) == "connection refused"
    assert first_line("x" * 500, limit=20) == "x" * 17 + "..."
    assert len(first_line(ValueError("y" * 500))) == 200


@pytest.mark.parametrize("message", ["", "  \n \n"])
def test_first_line_of_a_blank_message_names_the_error(message):
    assert first_line(OSError(message)) == "OSError"
    assert first_line(message) == ""


def test_a_job_store_that_cannot_be_opened_is_named_without_its_password(monkeypatch):
    psycopg = pytest.importorskip("psycopg")
    from qimg.serve import store_postgres

    def refuse(url, **_):
        raise psycopg.OperationalError("\n")  # drivers raise errors with blank messages too

    monkeypatch.setattr(psycopg, "connect", refuse)
    with pytest.raises(RuntimeError) as err:
        store_postgres.connect("postgresql://me:secret@db.example:5432/jobs")
    assert str(err.value) == "cannot open the job store at db.example:5432/jobs: OperationalError"
