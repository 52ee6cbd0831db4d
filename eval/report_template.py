"""The static HTML page of `negatron report` (string.Template; values are escaped by the caller)."""

from string import Template

PAGE = Template("""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>$title</title>
<style>
  body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1180px;
         color: #1f2328; background: #ffffff; line-height: 1.45; padding: 0 1em; }
  h1 { font-size: 1.7em; border-bottom: 2px solid #d0d7de; padding-bottom: .3em; }
  h2 { font-size: 1.3em; margin-top: 1.8em; border-bottom: 1px solid #d0d7de; padding-bottom: .2em; }
  table { border-collapse: collapse; margin: .8em 0; font-size: .9em; }
  th, td { border: 1px solid #d0d7de; padding: .35em .7em; text-align: right; }
  th { background: #f6f8fa; }
  td:first-child, th:first-child { text-align: left; }
  td.best { font-weight: 700; background: #dafbe1; }
  td.sig { font-weight: 700; color: #1a7f37; }
  .meta { color: #57606a; font-size: .9em; }
  img { max-width: 100%; border: 1px solid #d0d7de; margin: .5em 0; }
  .note { color: #57606a; font-size: .9em; }
  .wide { overflow-x: auto; }
</style>
</head>
<body>
<h1>$title</h1>
<p class="meta">$subtitle</p>
<h2>Results ($metric)</h2>
<p class="note">Rows are runs, columns datasets; the best score in each column is in bold.</p>
$main_table
$runs_table
$charts
$comparisons
</body>
</html>
""")
