<#
.SYNOPSIS
  Checks whether this Windows PC can run a Garage node, and which engines it can run.

.DESCRIPTION
  Garage's embedded engine (llama.cpp) runs on any 64-bit Windows 10 or 11 PC, on the CPU when
  nothing better is there, so only an unsupported Windows stops a node from serving. Everything
  else limits which engines the node can run:
    - an NVIDIA driver 535 or newer: CUDA for the embedded engine, and vLLM;
    - WSL2, virtualization, and Podman or Docker Desktop: vLLM runs in a Linux container in WSL2.
  Each check prints what it found and, when something is missing, the exact fix.

  The Garage installer runs this after it copies its files. Run it again any time:
    powershell -NoProfile -ExecutionPolicy Bypass -File "$env:LOCALAPPDATA\Programs\Garage\resources\check-prereqs.ps1"
  After installing, `garage doctor` (garage.cmd in the install folder) checks the same and more.

  Exit code: 0 when the node can serve (warnings only limit engines), 1 when it cannot.

.PARAMETER Json
  Print the result as one JSON document (schema garage.prereqs/v1) instead of text.
#>
[CmdletBinding()]
param([switch]$Json)

Set-StrictMode -Version 2.0
$ErrorActionPreference = 'Stop'

# The same numbers as daemon/hardware/advice.ts (a test keeps them equal): the NVIDIA driver
# Garage asks for, and the free disk below which `garage doctor` warns.
$MinNvidiaDriverMajor = 535
$MinFreeDiskGiB = 20
$ToolTimeoutSeconds = 15

# Every problem this script can report, with its exact fix and what it limits. Keys are stable ids
# (the JSON's "advice"); a test checks that each has a problem, a fix and limits.
$Advice = @{
  'windows-32bit'            = @{
    Problem = 'This is a 32-bit Windows. Garage needs a 64-bit Windows 10 or 11.'
    Fix     = @('Install a 64-bit Windows 10 or 11 (Settings > System > About shows "System type").')
    Limits  = @('everything: no engine can run')
  }
  'windows-too-old'          = @{
    Problem = 'This Windows is older than Windows 10. Garage needs Windows 10 or 11.'
    Fix     = @('Upgrade to Windows 10 or 11.')
    Limits  = @('everything: no engine can run')
  }
  'nvidia-no-gpu'            = @{
    Problem = 'No NVIDIA GPU was found. The embedded engine serves on this PC''s other GPU (Vulkan) or on the CPU.'
    Fix     = @('Nothing to install. If this PC has an NVIDIA GPU, install its driver: NVIDIA App or https://www.nvidia.com/drivers, then check: nvidia-smi')
    Limits  = @('vLLM', 'CUDA in the embedded engine')
  }
  'nvidia-driver-missing'    = @{
    Problem = 'An NVIDIA GPU is present but its driver is not installed (no nvidia-smi).'
    Fix     = @('Install the NVIDIA Game Ready or Studio driver (NVIDIA App or https://www.nvidia.com/drivers), restart, then check: nvidia-smi')
    Limits  = @('vLLM', 'CUDA in the embedded engine')
  }
  'nvidia-driver-error'      = @{
    Problem = 'nvidia-smi did not answer: the NVIDIA driver is broken or hung.'
    Fix     = @('Reinstall the NVIDIA driver (NVIDIA App, or https://www.nvidia.com/drivers with "Perform a clean installation"), restart, then check: nvidia-smi')
    Limits  = @('vLLM', 'CUDA in the embedded engine')
  }
  'nvidia-driver-old'        = @{
    Problem = "The NVIDIA driver is older than $MinNvidiaDriverMajor. Garage's CUDA builds need $MinNvidiaDriverMajor or newer; older drivers fall back to Vulkan or the CPU."
    Fix     = @("Update the NVIDIA driver to $MinNvidiaDriverMajor or newer (NVIDIA App > Drivers, or https://www.nvidia.com/drivers), then check: nvidia-smi")
    Limits  = @('vLLM', 'CUDA in the embedded engine')
  }
  'wsl-missing'              = @{
    Problem = 'WSL2 (Windows Subsystem for Linux) is not installed. vLLM runs in a Linux container inside WSL2.'
    Fix     = @('In PowerShell as administrator: wsl --install', 'Restart Windows, then check: wsl --status')
    Limits  = @('vLLM')
  }
  'wsl-no-distro'            = @{
    Problem = 'WSL is installed but has no Linux distribution.'
    Fix     = @('In PowerShell: wsl --install -d Ubuntu', 'Then check: wsl -l -v (VERSION must be 2)')
    Limits  = @('vLLM')
  }
  'wsl-version1'             = @{
    Problem = 'Every WSL distribution runs as WSL 1; containers and the GPU need WSL 2.'
    Fix     = @('In PowerShell: wsl --set-default-version 2', 'Then convert one: wsl --set-version Ubuntu 2 (use a name from: wsl -l -v)')
    Limits  = @('vLLM')
  }
  'virtualization-off'       = @{
    Problem = 'CPU virtualization is turned off in the firmware. WSL2 and containers need it.'
    Fix     = @('Restart into the UEFI/BIOS setup and turn on Intel Virtualization Technology (VT-x) or AMD SVM Mode', 'Back in Windows, in PowerShell as administrator: wsl --install')
    Limits  = @('vLLM')
  }
  'containers-missing'       = @{
    Problem = 'Neither Podman nor Docker Desktop is installed. vLLM runs in a container.'
    Fix     = @('Podman: winget install -e --id RedHat.Podman, then: podman machine init; podman machine start', 'or Docker Desktop: winget install -e --id Docker.DockerDesktop (keep "Use the WSL 2 based engine" on)')
    Limits  = @('vLLM')
  }
  'container-engine-stopped' = @{
    Problem = 'Podman or Docker Desktop is installed but its engine does not answer.'
    Fix     = @('Podman: podman machine start (the first time: podman machine init)', 'Docker Desktop: start Docker Desktop and wait until it says "Engine running"')
    Limits  = @('vLLM')
  }
  'disk-low'                 = @{
    Problem = "Less than $MinFreeDiskGiB GiB free where Garage keeps its models."
    Fix     = @('Free some space on that drive (Settings > System > Storage), or set GARAGE_DATA_DIR to a folder on a larger drive')
    Limits  = @('larger models')
  }
}

$Checks = New-Object System.Collections.Generic.List[object]

# One check's result. $AdviceId names the problem in $Advice; none for a check that passed.
function Add-Check {
  param([string]$Id, [string]$Status, [string]$Summary, [string]$AdviceId = '')
  $entry = [ordered]@{ id = $Id; status = $Status; summary = $Summary; advice = $null; problem = $null; fix = @(); limits = @() }
  if ($AdviceId -ne '') {
    $a = $Advice[$AdviceId]
    $entry.advice = $AdviceId
    $entry.problem = $a.Problem
    $entry.fix = @($a.Fix)
    $entry.limits = @($a.Limits)
  }
  $Checks.Add($entry)
}

# An external tool's exit code and output (stdout then stderr), or $null when it cannot start;
# killed after $ToolTimeoutSeconds (a hung driver or engine must not hang the installer).
function Invoke-Tool {
  param([string]$File, [string[]]$Arguments)
  $psi = New-Object System.Diagnostics.ProcessStartInfo
  $psi.FileName = $File
  $psi.Arguments = [string]::Join(' ', $Arguments)
  $psi.UseShellExecute = $false
  $psi.RedirectStandardOutput = $true
  $psi.RedirectStandardError = $true
  $psi.CreateNoWindow = $true
  try { $p = [System.Diagnostics.Process]::Start($psi) } catch { return $null }
  $stdout = $p.StandardOutput.ReadToEndAsync()
  $stderr = $p.StandardError.ReadToEndAsync()
  if (-not $p.WaitForExit($ToolTimeoutSeconds * 1000)) {
    try { $p.Kill() } catch { }
    return [pscustomobject]@{ Code = -1; Output = "timed out after $ToolTimeoutSeconds s"; TimedOut = $true }
  }
  $p.WaitForExit()
  # wsl.exe writes UTF-16: read as bytes, its ASCII comes with a NUL after each character.
  $text = ($stdout.Result + "`n" + $stderr.Result) -replace "`0", ''
  return [pscustomobject]@{ Code = $p.ExitCode; Output = $text.Trim(); TimedOut = $false }
}

# A tool in System32: from a 32-bit process on 64-bit Windows (the installer) System32 is
# redirected to SysWOW64, which has no wsl.exe or nvidia-smi.exe; Sysnative is the real one.
function Find-SystemTool {
  param([string]$Name)
  $dirs = @()
  if ([Environment]::Is64BitOperatingSystem -and -not [Environment]::Is64BitProcess) {
    $dirs += Join-Path $env:windir 'Sysnative'
  }
  $dirs += Join-Path $env:windir 'System32'
  foreach ($dir in $dirs) {
    $path = Join-Path $dir $Name
    if (Test-Path -LiteralPath $path) { return $path }
  }
  $cmd = Get-Command $Name -ErrorAction SilentlyContinue | Select-Object -First 1
  if ($null -ne $cmd) { return $cmd.Source }
  return $null
}

function Test-Windows {
  $os = Get-CimInstance Win32_OperatingSystem
  $build = [int]$os.BuildNumber
  $summary = "$($os.Caption) (build $build, $($os.OSArchitecture))"
  if (-not [Environment]::Is64BitOperatingSystem) { Add-Check 'windows' 'blocker' $summary 'windows-32bit'; return }
  if ($build -lt 10240) { Add-Check 'windows' 'blocker' $summary 'windows-too-old'; return }
  Add-Check 'windows' 'ok' $summary
}

function Test-NvidiaDriver {
  $adapters = @(Get-CimInstance Win32_VideoController | Where-Object { $_.Name -like '*NVIDIA*' })
  $smi = Find-SystemTool 'nvidia-smi.exe'
  if ($null -eq $smi) {
    $nvsmi = Join-Path $env:ProgramFiles 'NVIDIA Corporation\NVSMI\nvidia-smi.exe'
    if (Test-Path -LiteralPath $nvsmi) { $smi = $nvsmi }
  }
  if ($null -eq $smi) {
    if ($adapters.Count -eq 0) { Add-Check 'nvidia-driver' 'warning' 'no NVIDIA GPU' 'nvidia-no-gpu' }
    else { Add-Check 'nvidia-driver' 'warning' "$($adapters[0].Name): no driver" 'nvidia-driver-missing' }
    return
  }
  $r = Invoke-Tool $smi @('--query-gpu=driver_version,name', '--format=csv,noheader')
  if ($null -eq $r -or $r.Code -ne 0) {
    $why = 'nvidia-smi failed'
    if ($null -ne $r) { $why = 'nvidia-smi: ' + ($r.Output -split "`n")[0] }
    Add-Check 'nvidia-driver' 'warning' $why 'nvidia-driver-error'
    return
  }
  $first = ($r.Output -split "`n")[0]
  $fields = $first -split ','
  $version = $fields[0].Trim()
  $name = ''
  if ($fields.Count -gt 1) { $name = $fields[1].Trim() }
  $major = 0
  if (-not [int]::TryParse(($version -split '\.')[0], [ref]$major)) {
    Add-Check 'nvidia-driver' 'warning' "nvidia-smi printed an unknown driver version: $first" 'nvidia-driver-error'
    return
  }
  if ($major -lt $MinNvidiaDriverMajor) { Add-Check 'nvidia-driver' 'warning' "$name, driver $version" 'nvidia-driver-old'; return }
  Add-Check 'nvidia-driver' 'ok' "$name, driver $version"
}

function Test-Wsl2 {
  $wsl = Find-SystemTool 'wsl.exe'
  if ($null -eq $wsl) { Add-Check 'wsl2' 'warning' 'wsl.exe not found' 'wsl-missing'; return }
  $env:WSL_UTF8 = '1'
  $list = Invoke-Tool $wsl @('--list', '--verbose')
  if ($null -ne $list -and $list.Code -eq 0) {
    # Lines like "* Ubuntu    Running    2": the last column is the WSL version.
    $distros = @($list.Output -split "`n" | Select-Object -Skip 1 | ForEach-Object { $_.Trim() } | Where-Object { $_ -ne '' })
    $wsl2 = @($distros | Where-Object { ($_ -split '\s+')[-1] -eq '2' })
    if ($wsl2.Count -gt 0) {
      $name = (($wsl2[0] -replace '^\*\s*', '') -split '\s+')[0]
      Add-Check 'wsl2' 'ok' "WSL2: $name"
      return
    }
    if ($distros.Count -gt 0) { Add-Check 'wsl2' 'warning' 'only WSL 1 distributions' 'wsl-version1'; return }
  }
  $status = Invoke-Tool $wsl @('--status')
  if ($null -ne $status -and $status.Code -eq 0) { Add-Check 'wsl2' 'warning' 'WSL without a distribution' 'wsl-no-distro'; return }
  Add-Check 'wsl2' 'warning' 'WSL is not installed or not enabled' 'wsl-missing'
}

function Test-Virtualization {
  # With Hyper-V or WSL2's platform running, the firmware flag reads false: the hypervisor owns it.
  $cs = Get-CimInstance Win32_ComputerSystem
  if ($cs.HypervisorPresent) { Add-Check 'virtualization' 'ok' 'a hypervisor is running (Hyper-V or the WSL2 platform)'; return }
  $cpu = Get-CimInstance Win32_Processor | Select-Object -First 1
  if ($cpu.VirtualizationFirmwareEnabled) { Add-Check 'virtualization' 'ok' 'enabled in the firmware'; return }
  Add-Check 'virtualization' 'warning' 'turned off in the firmware' 'virtualization-off'
}

function Test-ContainerEngine {
  $installed = @()
  foreach ($tool in @(
      @{ Name = 'Podman'; File = 'podman.exe'; Args = @('version') },
      @{ Name = 'Docker Desktop'; File = 'docker.exe'; Args = @('version', '--format', '{{.Server.Version}}') }
    )) {
    $cmd = Get-Command $tool.File -ErrorAction SilentlyContinue | Select-Object -First 1
    if ($null -eq $cmd) { continue }
    $installed += $tool.Name
    $r = Invoke-Tool $cmd.Source $tool.Args
    if ($null -ne $r -and $r.Code -eq 0) { Add-Check 'container-engine' 'ok' "$($tool.Name): engine running"; return }
  }
  if ($installed.Count -eq 0) { Add-Check 'container-engine' 'warning' 'no Podman or Docker Desktop' 'containers-missing'; return }
  Add-Check 'container-engine' 'warning' "$([string]::Join(', ', $installed)) installed, engine not answering" 'container-engine-stopped'
}

function Test-Disk {
  $dataDir = $env:GARAGE_DATA_DIR
  if ([string]::IsNullOrEmpty($dataDir)) { $dataDir = Join-Path $env:APPDATA 'Garage' }
  $drive = New-Object System.IO.DriveInfo ([System.IO.Path]::GetPathRoot($dataDir))
  $freeGiB = [math]::Floor($drive.AvailableFreeSpace / 1GB)
  $summary = "$freeGiB GiB free on $($drive.Name)"
  if ($freeGiB -lt $MinFreeDiskGiB) { Add-Check 'disk' 'warning' $summary 'disk-low'; return }
  Add-Check 'disk' 'ok' $summary
}

foreach ($test in @('Test-Windows', 'Test-NvidiaDriver', 'Test-Wsl2', 'Test-Virtualization', 'Test-ContainerEngine', 'Test-Disk')) {
  try { & $test }
  catch {
    # A check that cannot run must not hide the others: report it and go on.
    $id = ($test -replace '^Test-', '').ToLowerInvariant()
    $Checks.Add([ordered]@{ id = $id; status = 'warning'; summary = "could not check: $($_.Exception.Message)"; advice = $null; problem = $null; fix = @(); limits = @() })
  }
}

$blockers = @($Checks | Where-Object { $_.status -eq 'blocker' })
$warnings = @($Checks | Where-Object { $_.status -eq 'warning' })
$canServe = $blockers.Count -eq 0

if ($Json) {
  $doc = [ordered]@{ schema = 'garage.prereqs/v1'; canServe = $canServe; checks = $Checks.ToArray() }
  ConvertTo-Json -InputObject $doc -Depth 5
}
else {
  Write-Output 'Garage: can this PC run a node?'
  foreach ($c in $Checks) {
    Write-Output ('  [{0}] {1}: {2}' -f $c.status, $c.id, $c.summary)
    if ($null -ne $c.problem) {
      Write-Output "      $($c.problem)"
      Write-Output "      limits: $([string]::Join(', ', $c.limits))"
      foreach ($step in $c.fix) { Write-Output "      fix: $step" }
    }
  }
  if ($canServe) {
    Write-Output "This PC can serve: the embedded engine runs here ($($warnings.Count) warning(s) limit other engines)."
  }
  else {
    Write-Output 'This PC cannot run a Garage node: fix the blocker above.'
  }
}

if ($canServe) { exit 0 } else { exit 1 }
