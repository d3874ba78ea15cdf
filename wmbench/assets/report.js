// Sortable tables: a click on a column header (or Enter/Space on it) sorts the table's rows by
// that column, ascending then descending. Numeric cells carry data-sort; empty cells sort last.
(function () {
  "use strict";
  function value(row, index) {
    var cell = row.cells[index];
    if (!cell) { return ""; }
    var sort = cell.getAttribute("data-sort");
    return sort === null ? cell.textContent.trim() : sort;
  }
  function compare(a, b) {
    var x = parseFloat(a), y = parseFloat(b);
    if (!isNaN(x) || !isNaN(y) || a === "NaN" || b === "NaN") {
      if (isNaN(x) && isNaN(y)) { return 0; }
      if (isNaN(x)) { return 1; }
      if (isNaN(y)) { return -1; }
      return x < y ? -1 : x > y ? 1 : 0;
    }
    return a.localeCompare(b);
  }
  function sortBy(table, header, index) {
    var ascending = header.getAttribute("aria-sort") !== "ascending";
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows).map(function (row, i) { return [row, i]; });
    rows.sort(function (p, q) {
      var a = value(p[0], index), b = value(q[0], index);
      var missingA = a === "NaN", missingB = b === "NaN";
      if (missingA !== missingB) { return missingA ? 1 : -1; }  // missing last either way
      var c = compare(a, b);
      return (ascending ? c : -c) || p[1] - q[1];
    });
    rows.forEach(function (pair) { body.appendChild(pair[0]); });
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th) { th.setAttribute("aria-sort", "none"); });
    header.setAttribute("aria-sort", ascending ? "ascending" : "descending");
  }
  Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), function (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, index) {
      var button = th.querySelector("button");
      (button || th).addEventListener("click", function () { sortBy(table, th, index); });
    });
  });
})();
