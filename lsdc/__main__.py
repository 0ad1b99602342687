from lsdc.cli import app

app()
